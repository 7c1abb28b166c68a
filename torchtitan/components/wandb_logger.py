"""The Weights & Biases run behind MetricsLogger: its project, name, group and mode, and quiet settings.

Every value follows one order: the metrics.wandb_* key when set, else the WANDB_* environment variable that
wandb itself reads, else a fallback from the run (the dump folder's name, project "torchtitan"). The wandb
package is imported only when metrics.enable_wandb is on, so the trainer does not need it otherwise.
"""
from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Mapping

from torchtitan.config.job_config import Metrics as MetricsConfig
from torchtitan.tools.errors import ConfigError

logger = logging.getLogger("torchtitan")

# The WANDB_MODE values wandb accepts. Checked here because wandb fails on any other value deep inside its
# settings validation, with a traceback instead of a line that names the variable.
WANDB_ENV_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")

# Fault tolerance gives each replica group's rank 0 the log folder {dump_folder}/replica_<id>.
_REPLICA_FOLDER = re.compile(r"replica_(\d+)")

# Settings that keep wandb from doing work a trainer does not want from it: no stdout/stderr capture (the
# trainer's log already has every line), no copy of the code, no git probing (slow on large checkouts, and
# absent in containers), no requirements file, and no system sampler or machine probe (the trainer logs its
# own memory and throughput; the probes cost seconds at start and extra processes). The x_* names are
# wandb's private ones, so only those this wandb version knows are passed.
_QUIET_SETTINGS = {"console": "off", "save_code": False, "disable_code": True, "disable_git": True,
                   "disable_job_creation": True, "quiet": True, "x_save_requirements": False,
                   "x_disable_stats": True, "x_disable_machine_info": True}


def resolve_mode(cfg_mode: str, env: Mapping[str, str], has_credentials: Callable[[], bool]) -> str:
    """online/offline from the config; under auto WANDB_MODE, else online only where credentials exist."""
    if cfg_mode != "auto":
        return cfg_mode
    env_mode = env.get("WANDB_MODE", "")
    if env_mode:
        if env_mode not in WANDB_ENV_MODES:
            raise ConfigError(f"WANDB_MODE={env_mode!r} is not a wandb mode (one of {', '.join(WANDB_ENV_MODES)}); "
                              f"unset it or set metrics.wandb_mode")
        return env_mode
    return "online" if has_credentials() else "offline"


def init_kwargs(cfg: MetricsConfig, folder: str, env: Mapping[str, str],
                has_credentials: Callable[[], bool]) -> dict:
    """The wandb.init arguments for a run logging to `folder` (everything except config and settings)."""
    folder = os.path.abspath(folder)
    base, name = os.path.split(folder)
    replica = _REPLICA_FOLDER.fullmatch(name)
    run_folder = os.path.basename(base) if replica else name  # the dump folder, above replica_<id>
    run_name = cfg.wandb_run_name or env.get("WANDB_NAME") or run_folder
    group = cfg.wandb_group or env.get("WANDB_RUN_GROUP") or None
    if replica:
        # One W&B run per replica group: distinct names, and one group so the dashboard shows them together.
        run_name = f"{run_name}-replica{replica.group(1)}"
        group = group or run_folder
    tags = list(cfg.wandb_tags) or [t.strip() for t in env.get("WANDB_TAGS", "").split(",") if t.strip()]
    return {"project": cfg.wandb_project or env.get("WANDB_PROJECT") or "torchtitan",
            "entity": cfg.wandb_entity or env.get("WANDB_ENTITY") or None,  # None: the account's default entity
            "name": run_name, "group": group, "tags": tags or None,
            "mode": resolve_mode(cfg.wandb_mode, env, has_credentials),
            "dir": folder}  # wandb puts its run folder in {dir}/wandb


def _wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError("metrics.enable_wandb needs the wandb package: pip install wandb") from None
    return wandb


@functools.cache  # asked at most once per process: wandb prints a line each time it finds a key
def _has_credentials() -> bool:
    wandb = _wandb()
    # wandb's own lookup (WANDB_API_KEY, an identity token file, its settings file, the netrc entry of
    # WANDB_BASE_URL's host); with prompt and verify off it neither asks nor touches the network.
    try:
        return wandb.login(prompt=False, verify=False)
    except wandb.errors.AuthenticationError as e:
        raise ConfigError(f"metrics.enable_wandb: the W&B credentials are unusable: {e}") from None


def check_wandb(cfg: MetricsConfig, folder: str, env: Mapping[str, str] | None = None) -> dict:
    """The wandb.init arguments, or the one-line ConfigError a run would otherwise hit on rank 0 alone (no wandb
    package, a bad WANDB_MODE, online without credentials): trainer/checks.py calls it on every rank first."""
    _wandb()
    kwargs = init_kwargs(cfg, folder, os.environ if env is None else env, _has_credentials)
    if kwargs["mode"] == "online" and not _has_credentials():
        raise ConfigError("metrics.wandb_mode online needs W&B credentials: set WANDB_API_KEY or run `wandb login` "
                          "(or use metrics.wandb_mode = \"offline\" and `wandb sync` later)")
    return kwargs


def open_wandb_run(cfg: MetricsConfig, folder: str, run_config: dict | None, env: Mapping[str, str] | None = None):
    """Start the W&B run for the metrics written to `folder`; the caller logs to it and finishes it."""
    wandb = _wandb()
    kwargs = check_wandb(cfg, folder, env)
    known = wandb.Settings.model_fields
    settings = wandb.Settings(**{k: v for k, v in _QUIET_SETTINGS.items() if k in known})
    run = wandb.init(config=run_config or {}, settings=settings, **kwargs)
    if kwargs["mode"] == "offline":
        logger.info(f"W&B: offline run {kwargs['name']} in {run.settings.sync_dir}; upload it with "
                    f"`wandb sync {run.settings.sync_dir}`")
    elif kwargs["mode"] != "disabled":
        logger.info(f"W&B: run {kwargs['name']} at {run.url}")
    return run
