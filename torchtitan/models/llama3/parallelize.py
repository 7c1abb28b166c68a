"""parallelize_llama: TP -> CP -> activation checkpointing -> compile -> FSDP/HSDP (or DDP).

The order is the design: TP rewrites the linears into DTensors first, CP swaps
the attention core, AC wraps blocks that already hold their final modules,
compile traces those wrapped blocks, and FSDP shards last over whatever
parameters remain.
"""
from __future__ import annotations

import torch
from torch import nn

from torchtitan.config.job_config import JobConfig
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.distributed.compile import apply_compile
from torchtitan.distributed.data_parallel import DTYPES, apply_ddp, apply_fsdp, reshard_policy
from torchtitan.distributed.parallel_dims import ParallelDims


def parallelize_llama(model: nn.Module, dims: ParallelDims, cfg: JobConfig, device_type: str) -> nn.Module:
    p = cfg.parallelism
    if dims.tp_enabled:
        from torchtitan.models.llama3.tensor_parallel import apply_tp

        apply_tp(model, dims.mesh["tp"], loss_parallel=not p.disable_loss_parallel,
                 async_tp=p.enable_async_tensor_parallel)
    if dims.cp_enabled:
        from torchtitan.distributed.context_parallel import apply_cp

        apply_cp(model, dims.mesh["cp"], p.context_parallel_rotate_method)
    if "float8" in cfg.model.converters:
        from torchtitan.components.float8 import convert_to_float8

        convert_to_float8(model, cfg.float8)
    apply_ac(model, cfg.activation_checkpoint)
    if cfg.compile.enable and "model" in cfg.compile.components:
        apply_compile(model)
    if dims.fsdp_enabled:
        # CPU has no bf16 fast path worth the precision loss: train in float32 there.
        param_dtype = DTYPES[cfg.training.mixed_precision_param] if device_type == "cuda" else torch.float32
        mesh = dims.mesh["dp_replicate", "dp_shard_cp"] if dims.dp_replicate > 1 else dims.mesh["dp_shard_cp"]
        apply_fsdp(model, mesh, param_dtype, DTYPES[cfg.training.mixed_precision_reduce],
                   reshard_policy(p.fsdp_reshard_after_forward, dims.pp_enabled), cfg.training.enable_cpu_offload)
    elif dims.dp_replicate > 1:
        apply_ddp(model, dims.mesh["dp_replicate"])
    return model
