"""The errors a user can cause and fix: each prints as one line and ends the job with a non-zero exit.

Everything else (a bug in our code or in torch) is not a UserError and keeps its
traceback. The classes live at the bottom layer so that every package, from
config parsing to checkpoint formats, raises the same kinds.
"""
from __future__ import annotations

# Exit codes of the trainer: a user error before training starts (config) and during it (checkpoint, data,
# divergence). Both have printed their one line; any other non-zero code is a crash with a traceback.
EXIT_CONFIG_ERROR = 2
EXIT_USER_ERROR = 3


class UserError(Exception):
    """A problem with the job's input (config, files, data); the message names it and the fix."""


class ConfigError(UserError, ValueError):
    """A configuration key, value or combination that cannot run."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or model file that cannot be used; the message names the folder and the problem."""


class DataError(UserError, ValueError):
    """Training data that cannot be read, or that no longer matches a resumed run."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss or gradient norm became non-finite; the message names the first such step."""
