"""The decoder's parallelize sequence: TP -> CP -> EP -> converters (float8) -> AC -> compile -> FSDP/HSDP (or DDP).

The order is the design: TP rewrites the linears into DTensors first, CP swaps
the attention core, converters swap the remaining linears, AC wraps blocks that
already hold their final modules, compile traces those wrapped blocks, and FSDP
shards last over whatever parameters remain. The TP plan is read off the
blocks' declarations (each block, attention kind and feed-forward kind says how it
is sharded), so every family shares it. The model code knows nothing about any of this.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from torchtitan.config.job_config import ActivationCheckpoint, Compile, Parallelism
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.distributed.compile import apply_compile
from torchtitan.distributed.context_parallel import apply_cp
from torchtitan.distributed.data_parallel import FSDPSettings, apply_ddp, apply_fsdp
from torchtitan.distributed.expert_parallel import apply_moe_parallel, moe_layers
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.tensor_parallel import EmbeddingParallel, HeadShardedRMSNorm, enable_async_tp


def block_tp_plan(block: nn.Module) -> dict:
    """The block's plan, assembled from what its parts declare: the norms' (`norm_tp_plan`), the attention
    slot's and the feed-forward slot's (`tp_plan`, relative to the slot; "" is the slot itself)."""
    plan = dict(block.norm_tp_plan())
    for slot in ("attention", "feed_forward"):
        for name, style in getattr(block, slot).tp_plan().items():
            plan[f"{slot}.{name}" if name else slot] = style
    return plan


def outer_tp_plan(model: nn.Module, loss_parallel: bool) -> dict:
    plan: dict = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = EmbeddingParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        plan["norm"] = SequenceParallel()
    if model.output is not None:
        # Loss parallel keeps the logits vocab-sharded (a DTensor) so the (S x vocab) tensor is never gathered;
        # the trainer then runs the loss under `loss_parallel()`.
        plan["output"] = ColwiseParallel(input_layouts=Shard(1),
                                         output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                         use_local_output=not loss_parallel)
    return plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool, async_tp: bool) -> None:
    """Shard a decoder (or a pipeline stage of one) in place over `tp_mesh`; tp must divide the heads and
    KV heads (trainer/checks.py). Tied weights are re-tied: parallelize_module registers a fresh
    parameter per module."""
    parallelize_module(model, tp_mesh, outer_tp_plan(model, loss_parallel))
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_tp_plan(block))
        attn = block.attention
        for name, placements in attn.tp_placements().items():  # parameters the attention kind places itself
            module_name, _, param = name.rpartition(".")
            module = attn.get_submodule(module_name)
            value = getattr(module, param)
            setattr(module, param, nn.Parameter(distribute_tensor(value.data, tp_mesh, placements, src_data_rank=None),
                                                requires_grad=value.requires_grad))
        if attn.qk_norm == "width":
            attn.q_norm = HeadShardedRMSNorm(attn.q_norm, tp_mesh)
            attn.k_norm = HeadShardedRMSNorm(attn.k_norm, tp_mesh)
    model.tie_weights()
    if async_tp:
        enable_async_tp(tp_mesh)


def parallelize_decoder(model: nn.Module, *, dims: ParallelDims, parallelism: Parallelism, fsdp: FSDPSettings,
                        activation_checkpoint: ActivationCheckpoint, compile: Compile,
                        convert: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Apply every enabled parallelism to `model` (a decoder or one pipeline stage of it), in place.

    convert: model converters (float8) that run after TP and CP, which they rely on.
    """
    p = parallelism
    if dims.tp_enabled:
        apply_tp(model, dims.mesh["tp"], loss_parallel=not p.disable_loss_parallel,
                 async_tp=p.enable_async_tensor_parallel)
    if dims.cp_enabled:
        apply_cp(model, dims.mesh["cp"], p.context_parallel_rotate_method)
    moe_dims = tuple(d for d, on in (("ep", dims.ep_enabled), ("tp", dims.tp_enabled)) if on)
    if moe_dims and moe_layers(model):
        apply_moe_parallel(model, dims.mesh[moe_dims])
    if convert is not None:
        convert(model)
    apply_ac(model, activation_checkpoint)
    if compile.enable and "model" in compile.components:
        apply_compile(model)
    if dims.fsdp_enabled:
        rep = ("dp_replicate",) if dims.dp_replicate > 1 else ()
        # Experts under EP are sharded by FSDP over the data ranks outside their expert group.
        expert_mesh = dims.mesh[(*rep, "efsdp")] if dims.ep_enabled else None
        apply_fsdp(model, dims.mesh[(*rep, "dp_shard_cp")], fsdp.param_dtype, fsdp.reduce_dtype,
                   fsdp.reshard_after_forward, fsdp.cpu_offload, tied=model.is_tied, expert_mesh=expert_mesh)
    elif dims.dp_replicate > 1:
        apply_ddp(model, dims.mesh["dp_replicate"])
    return model
