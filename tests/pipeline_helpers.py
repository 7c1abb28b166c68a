"""Pipeline test helpers shared by tests/integration/test_pipeline_parity.py, tests/unit/distributed/test_pipeline.py
and tests/unit/trainer/test_checks.py."""
from __future__ import annotations

from torchtitan.config.job_config import JobConfig

# 4 stages over 2 ranks, placed round-robin (rank 0: stages 0 and 2), 4 micro-batches.
# Rank 0 runs breadth-first; rank 1 alternates forward and backward on the last stage.
CSV_ROWS = [
    "0F0,0F1,0F2,0F3,2F0,2F1,2F2,2F3,2B0,2B1,2B2,2B3,0B0,0B1,0B2,0B3",
    "1F0,1F1,1F2,1F3,3F0,3B0,3F1,3B1,3F2,3B2,3F3,3B3,1B0,1B1,1B2,1B3",
]


def pp_cfg(**parallelism) -> JobConfig:
    """The default job with pipeline_parallel_degree 2 and these parallelism settings."""
    cfg = JobConfig()
    cfg.parallelism.pipeline_parallel_degree = 2
    for key, value in parallelism.items():
        setattr(cfg.parallelism, key, value)
    return cfg
