"""parallelize_olmo2: the shared decoder sequence with the OLMo 2 TP plan (QK-norm over the full width)."""
from __future__ import annotations

from torch import nn

from torchtitan.config.job_config import JobConfig
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.models.common.parallelize import parallelize_decoder


def parallelize_olmo2(model: nn.Module, dims: ParallelDims, cfg: JobConfig, device_type: str) -> nn.Module:
    from torchtitan.models.olmo2.tensor_parallel import apply_tp

    return parallelize_decoder(model, dims, cfg, device_type, apply_tp)
