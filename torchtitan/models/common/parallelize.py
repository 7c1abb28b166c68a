"""The parallelize sequence every decoder family here shares:
TP -> CP -> float8 -> activation checkpointing -> compile -> FSDP/HSDP (or DDP).

The order is the design: TP rewrites the linears into DTensors first, CP swaps
the attention core, float8 swaps the remaining linears, AC wraps blocks that
already hold their final modules, compile traces those wrapped blocks, and FSDP
shards last over whatever parameters remain. Only the TP plan is a family's own
(passed in); FSDP knows about tied embeddings: a weight shared by the embedding
and the output must live in exactly one FSDP group, and after TP re-registration
it must be re-tied. The model code knows nothing about any of this.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from torchtitan.config.job_config import JobConfig
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.distributed.compile import apply_compile
from torchtitan.distributed.data_parallel import DTYPES, apply_ddp, apply_fsdp, reshard_policy
from torchtitan.distributed.parallel_dims import ParallelDims


def is_tied(model: nn.Module) -> bool:
    emb, out = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    return bool(getattr(model.args, "tie_word_embeddings", False)) and emb is not None and out is not None


def retie(model: nn.Module) -> None:
    """parallelize_module registers a fresh parameter per module, which unties embedding and output.

    Both are sharded on the vocabulary dim under TP (RowwiseParallel embedding, ColwiseParallel
    output), so the embedding's DTensor serves the output as is.
    """
    if is_tied(model) and model.output.weight is not model.tok_embeddings.weight:
        model.output.weight = model.tok_embeddings.weight


def apply_fsdp_tied(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
                    reshard_after_forward: bool, cpu_offload: bool = False) -> None:
    """apply_fsdp for a tied model: the embedding joins norm + output in one group that stays gathered
    from the embedding lookup until backward is done with the output (it is the same weight)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = dict(mesh=dp_mesh, mp_policy=mp)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kw)
    ends = [m for m in (model.tok_embeddings, model.norm, model.output) if m is not None]
    fully_shard(ends, reshard_after_forward=False, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    for prev, nxt in zip(blocks[:-1], blocks[1:]):
        prev.set_modules_to_forward_prefetch([nxt])
        nxt.set_modules_to_backward_prefetch([prev])


def parallelize_decoder(model: nn.Module, dims: ParallelDims, cfg: JobConfig, device_type: str,
                        apply_tp: Callable[..., None]) -> nn.Module:
    """The shared sequence; `apply_tp(model, tp_mesh, loss_parallel, async_tp)` is the family's TP plan."""
    p = cfg.parallelism
    if dims.tp_enabled:
        apply_tp(model, dims.mesh["tp"], loss_parallel=not p.disable_loss_parallel,
                 async_tp=p.enable_async_tensor_parallel)
        retie(model)
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
        shard = apply_fsdp_tied if is_tied(model) else apply_fsdp
        shard(model, mesh, param_dtype, DTYPES[cfg.training.mixed_precision_reduce],
              reshard_policy(p.fsdp_reshard_after_forward, dims.pp_enabled), cfg.training.enable_cpu_offload)
    elif dims.dp_replicate > 1:
        apply_ddp(model, dims.mesh["dp_replicate"])
    return model
