"""The batch arithmetic of a job, computed once: micro-batches, accumulation, sequences and tokens per step.

The global batch counts every replica group of the full job (fault tolerance: fault_tolerance.group_size
groups, each with its own data-parallel ranks). With fewer groups present a step's batch shrinks to theirs
(`step_tokens`); the accumulation does not change.
"""
from __future__ import annotations

from dataclasses import dataclass

from torchtitan.tools.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    local_batch_size: int  # sequences per data-parallel rank per micro-batch
    seq_len: int  # tokens per sequence
    dp: int  # data-parallel ranks inside one replica group
    groups: int = 1  # replica groups in the full job
    accumulation: int = 1  # micro-batches per optimizer step

    @classmethod
    def build(cls, *, local_batch_size: int, global_batch_size: int, seq_len: int, dp: int,
              groups: int = 1) -> BatchPlan:
        """global_batch_size -1: one micro-batch per rank per step; else a multiple of local x dp x groups."""
        per_micro = local_batch_size * dp * groups
        if global_batch_size <= 0:
            return cls(local_batch_size, seq_len, dp, groups)
        if global_batch_size % per_micro:
            groups_part = f" x fault_tolerance.group_size {groups}" if groups > 1 else ""
            raise ConfigError(f"training.global_batch_size = {global_batch_size} must be a multiple of "
                              f"training.local_batch_size {local_batch_size} x data-parallel degree {dp}{groups_part} "
                              f"= {per_micro}")
        return cls(local_batch_size, seq_len, dp, groups, global_batch_size // per_micro)

    @property
    def group_batch_size(self) -> int:
        """Sequences per step in one replica group (all its dp ranks and micro-batches)."""
        return self.local_batch_size * self.dp * self.accumulation

    @property
    def global_batch_size(self) -> int:
        return self.group_batch_size * self.groups

    def step_tokens(self, groups_present: int = 1) -> int:
        """Tokens trained in a step with this many replica groups present."""
        return self.group_batch_size * self.seq_len * groups_present

    def describe(self) -> str:
        groups = f" x {self.groups} groups" if self.groups > 1 else ""
        return (f"batch {self.global_batch_size} x {self.seq_len} tokens = {self.local_batch_size} per rank x "
                f"dp {self.dp}{groups} x {self.accumulation} micro-batches")
