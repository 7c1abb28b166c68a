"""Instance filters: decide, per block of fixed-length instances, which ones to drop from training.

Degenerate instances (a token or a short n-gram repeated over and over, as in boilerplate,
scraped tables or broken documents) waste steps and are a known source of loss spikes, so
OLMo drops them from the loss. The filter here reproduces OLMo-core's definition exactly
(`find_periodic_sequences` in olmo_core/data/utils.py, used by `_validate_instance` in
olmo_core/data/numpy_dataset.py) but works on a whole block of instances at once with numpy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from torchtitan.tools.errors import ConfigError

# OLMo-core's detector only reports runs in which the pattern occurs at least 3 times (it aligns
# the sequence on rows of `period` tokens and needs two whole equal rows), so a smaller
# max_count behaves as 3 there; it does here too.
_MIN_REPORTED_COUNT = 3


@dataclass(frozen=True)
class RepetitionFilter:
    """Drops an instance that contains a pattern of period p, min_period <= p <= max_period, occurring
    at least max_count times back to back.

    Mirrors OLMo-core's instance filter (InstanceFilterConfig(repetition_max_period=13,
    repetition_min_period=1, repetition_max_count=32), same defaults). For a period p, a maximal run
    of L consecutive positions i with x[i] == x[i + p] covers L + p tokens, in which the period-p
    pattern occurs (L + p) // p = 1 + L // p times (a trailing partial copy does not count); the
    instance is dropped when that is >= max_count for some p. "Dropped" in OLMo-core means its
    instance_mask is False, so all of its labels are ignored.
    """

    max_period: int = 13
    min_period: int = 1
    max_count: int = 32

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject settings that cannot mean anything, naming the config keys the user sets."""
        if self.min_period < 1:
            raise ConfigError(f"data.instance_filter_min_period must be >= 1, got {self.min_period}")
        if self.max_period < self.min_period:
            raise ConfigError(
                f"data.instance_filter_max_period ({self.max_period}) must be >= "
                f"data.instance_filter_min_period ({self.min_period})"
            )
        if self.max_count < 2:
            raise ConfigError(f"data.instance_filter_max_count must be >= 2, got {self.max_count}")

    def drop_mask(self, tokens: np.ndarray) -> np.ndarray:
        """Return a bool array (num_instances,), True where the instance of `tokens` should be dropped.

        `tokens` is (num_instances, seq_len) integer token ids. Per period the work is a few passes
        over the block (memory about 5 bytes per token for the rows that need the exact check).
        """
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be 2-D (num_instances, seq_len), got shape {tokens.shape}")
        num_instances, seq_len = tokens.shape
        drop = np.zeros(num_instances, dtype=bool)
        count = max(self.max_count, _MIN_REPORTED_COUNT)
        for period in range(self.min_period, self.max_period + 1):
            # `count` occurrences of the pattern need a run of (count - 1) * period equalities.
            need = (count - 1) * period
            if need > seq_len - period:
                break  # longer periods need even longer runs
            equal = tokens[:, period:] == tokens[:, :-period]
            # A row with fewer equalities than the run needs cannot hold it: on real data this skips
            # almost every row before the exact check.
            rows = np.flatnonzero(~drop & (np.count_nonzero(equal, axis=1) >= need))
            if rows.size:
                drop[rows] = _has_true_run(equal[rows], need)
        return drop


def _has_true_run(mask: np.ndarray, length: int) -> np.ndarray:
    """Per row of a 2-D bool array: whether it has `length` consecutive True values."""
    csum = np.zeros((mask.shape[0], mask.shape[1] + 1), dtype=np.int32)
    np.cumsum(mask, axis=1, dtype=np.int32, out=csum[:, 1:])
    # A window of `length` positions is all True iff its count of True values is `length`.
    return ((csum[:, length:] - csum[:, :-length]) == length).any(axis=1)
