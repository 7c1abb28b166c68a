"""FSDP2 / HSDP and DDP over the data-parallel dims of the mesh."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard


@dataclass(frozen=True)
class FSDPSettings:
    """What FSDP is told, decided once by the job's plan (trainer/plan.py)."""

    param_dtype: torch.dtype  # compute dtype of gathered parameters
    reduce_dtype: torch.dtype  # gradient reduce-scatter dtype
    reshard_after_forward: bool
    cpu_offload: bool = False


def reshard_policy(setting: str, pp_enabled: bool) -> bool:
    """default: free gathered params after forward, except under PP where each micro-batch would re-gather."""
    if setting == "always":
        return True
    if setting == "never":
        return False
    return not pp_enabled


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               reshard_after_forward: bool, cpu_offload: bool = False, tied: bool = False,
               expert_mesh: DeviceMesh | None = None) -> None:
    """Shard a decoder (tok_embeddings, layers, norm, output; None where a pipeline stage lacks them).

    Units: the embedding, each block, norm + output, then the root for what is left. A tied
    embedding is the output's weight, and a parameter must live in exactly one FSDP group, so it
    joins the norm + output unit, which stays gathered from the embedding lookup until backward is
    done with the output.

    expert_mesh: under expert parallel, each MoE layer's experts are their own unit over this mesh (the
    data ranks outside the expert group); the experts scale their own gradients for the rest of the
    average (distributed/expert_parallel.py).
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = dict(mesh=dp_mesh, mp_policy=mp)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    if model.tok_embeddings is not None and not tied:
        fully_shard(model.tok_embeddings, reshard_after_forward=reshard_after_forward, **kw)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        last = i == len(blocks) - 1
        if expert_mesh is not None and block.feed_forward.is_moe:
            fully_shard(block.feed_forward.experts, **{**kw, "mesh": expert_mesh},
                        shard_placement_fn=_even_expert_shards(expert_mesh),
                        reshard_after_forward=reshard_after_forward and not last)
        fully_shard(block, reshard_after_forward=reshard_after_forward and not last,
                    shard_placement_fn=_even_expert_shards(dp_mesh), **kw)
    ends = (model.tok_embeddings,) if tied else ()
    tail = [m for m in (*ends, model.norm, model.output) if m is not None]
    if tail:
        fully_shard(tail, reshard_after_forward=False, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    # Prefetch the next block's all-gather one block ahead in forward and backward.
    for prev, nxt in zip(blocks[:-1], blocks[1:]):
        prev.set_modules_to_forward_prefetch([nxt])
        nxt.set_modules_to_backward_prefetch([prev])


def _even_expert_shards(mesh: DeviceMesh):
    """FSDP shards dim 0; stacked expert weights (E, out, in) whose (local) E does not split over the FSDP ranks
    would be padded to whole experts per rank: those are sharded on their rows (dim 1) instead."""
    size = mesh[mesh.mesh_dim_names[-1]].size()

    def placement(p: nn.Parameter) -> Shard | None:
        local = p.to_local() if isinstance(p, DTensor) else p
        if local.ndim == 3 and local.shape[0] % size and local.shape[1] % size == 0:
            return Shard(1)
        return None
    return placement


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh) -> None:
    """Replicate parameters and all-reduce gradients (composable DDP)."""
    from torch.distributed._composable.replicate import replicate

    replicate(model, device_mesh=dp_mesh, bucket_cap_mb=100)
