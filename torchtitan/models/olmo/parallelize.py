"""parallelize_olmo: the shared decoder sequence with OLMo's tensor-parallel plan."""
from __future__ import annotations

from torch import nn

from torchtitan.config.job_config import JobConfig
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.models.common.parallelize import parallelize_decoder


def parallelize_olmo(model: nn.Module, dims: ParallelDims, cfg: JobConfig, device_type: str) -> nn.Module:
    from torchtitan.models.olmo.tensor_parallel import apply_tp

    return parallelize_decoder(model, dims, cfg, device_type, apply_tp)
