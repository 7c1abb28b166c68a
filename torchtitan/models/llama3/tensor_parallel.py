"""Tensor and sequence parallel plan for Llama 3 (Megatron-style, over the "tp" mesh dim).

Between blocks the residual stream is sharded on the sequence (Shard(1)), so
norms run on 1/tp of the tokens and activations cost 1/tp of the memory; each
attention and feed-forward gathers the sequence on entry (all-gather) and
reduce-scatters on exit. Attention heads and FFN hidden units are split across
ranks; the model reshapes heads with -1, so each rank simply sees its local
heads (query and KV heads alike, hence tp must divide both: preflight checks).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


class _EmbeddingParallel(RowwiseParallel):
    """RowwiseParallel for the embedding, handing the first block a tensor of its own.

    The stock style returns `to_local()` of an async reduce-scatter: a view/async wrapper of
    the DTensor's storage. A compiled first block (AOTAutograd) then routes that input's
    gradient past to_local's backward and the reduce-scatter's backward receives a plain
    tensor ("'Tensor' object has no attribute '_local_tensor'", torch 2.13). One copy of
    the (B, S/tp, dim) activation avoids it.
    """

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        out = RowwiseParallel._prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh)
        return out.clone() if use_local_output else out


def _block_plan() -> dict:
    # Attention.forward(x, rope, positions) is called positionally: rope and positions stay plain tensors.
    return {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                        desired_input_layouts=(Replicate(), None, None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }


def _outer_plan(model: nn.Module, loss_parallel: bool) -> dict:
    plan: dict = {}
    if getattr(model, "tok_embeddings", None) is not None:
        plan["tok_embeddings"] = _EmbeddingParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if getattr(model, "norm", None) is not None:
        plan["norm"] = SequenceParallel()
    if getattr(model, "output", None) is not None:
        # Loss parallel keeps the logits vocab-sharded (a DTensor) so the (S x vocab) tensor is never gathered;
        # the trainer then runs the loss under `loss_parallel()`.
        plan["output"] = ColwiseParallel(input_layouts=Shard(1),
                                         output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                         use_local_output=not loss_parallel)
    return plan


def enable_async_tp(tp_mesh: DeviceMesh) -> None:
    """Let inductor overlap TP collectives with matmuls (micro-pipelining over symmetric memory)."""
    if tp_mesh.device_type != "cuda":
        raise ValueError("parallelism.enable_async_tensor_parallel needs CUDA (symmetric memory); "
                         f"the tp mesh is on {tp_mesh.device_type}")
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    torch._inductor.config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool, async_tp: bool) -> None:
    """Shard `model` in place over `tp_mesh`. Works on pipeline stages too (missing pieces are skipped)."""
    parallelize_module(model, tp_mesh, _outer_plan(model, loss_parallel))
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, _block_plan())
    if async_tp:
        enable_async_tp(tp_mesh)
