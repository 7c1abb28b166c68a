"""FSDP2 / HSDP and DDP over the data-parallel dims of the mesh."""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def reshard_policy(setting: str, pp_enabled: bool) -> bool:
    """default: free gathered params after forward, except under PP where each micro-batch would re-gather."""
    if setting == "always":
        return True
    if setting == "never":
        return False
    return not pp_enabled


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               reshard_after_forward: bool, cpu_offload: bool = False) -> None:
    """Shard each block, the embedding and norm+output as units, then the root (which holds what is left)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = dict(mesh=dp_mesh, mp_policy=mp)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    if getattr(model, "tok_embeddings", None) is not None:
        fully_shard(model.tok_embeddings, reshard_after_forward=reshard_after_forward, **kw)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        last = i == len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard_after_forward and not last, **kw)
    tail = [m for m in (getattr(model, "norm", None), getattr(model, "output", None)) if m is not None]
    if tail:
        fully_shard(tail, reshard_after_forward=False, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    # Prefetch the next block's all-gather one block ahead in forward and backward.
    for prev, nxt in zip(blocks[:-1], blocks[1:]):
        prev.set_modules_to_forward_prefetch([nxt])
        nxt.set_modules_to_backward_prefetch([prev])


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh) -> None:
    """Replicate parameters and all-reduce gradients (composable DDP)."""
    from torch.distributed._composable.replicate import replicate

    replicate(model, device_mesh=dp_mesh, bucket_cap_mb=100)
