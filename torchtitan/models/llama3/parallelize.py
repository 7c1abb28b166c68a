"""parallelize_llama: the shared decoder sequence (models/common/parallelize.py) with Llama's TP plan."""
from __future__ import annotations

from torch import nn

from torchtitan.config.job_config import JobConfig
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.models.common.parallelize import parallelize_decoder


def parallelize_llama(model: nn.Module, dims: ParallelDims, cfg: JobConfig, device_type: str) -> nn.Module:
    from torchtitan.models.llama3.tensor_parallel import apply_tp

    return parallelize_decoder(model, dims, cfg, device_type, apply_tp)
