"""Tensor-parallel building blocks that a model's TP plan (models/common/parallelize.py) uses.

Megatron-style TP with sequence parallel over the "tp" mesh dim: the residual
stream is sharded on the sequence between blocks, attention and feed-forward
gather it on entry and reduce-scatter on exit, heads and hidden units are split.
"""
from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import RowwiseParallel


class EmbeddingParallel(RowwiseParallel):
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


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is also an all-reduce: every rank uses the sum in its own
    part of the graph, so the gradient of each rank's input is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        ctx.mesh = mesh
        return funcol.wait_tensor(funcol.all_reduce(x, "sum", mesh))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return funcol.wait_tensor(funcol.all_reduce(grad.contiguous(), "sum", ctx.mesh)), None


class HeadShardedRMSNorm(nn.Module):
    """RMSNorm over a width that tensor parallel splits contiguously across the ranks of `mesh`.

    A QK-norm normalizes the whole q (k) projection, but under TP each rank holds only its heads'
    slice. Gathering q and k to normalize them (what transformers' TP plan does) costs two
    all-gathers of (B, S, width) per layer; instead each rank sums the squares of its slice and one
    all-reduce of a (B, S, 1) tensor gives the full-width mean square. Each rank then scales its
    slice by its slice of the weight, a DTensor sharded like the heads (checkpoints hold the full
    weight). The result equals the unsharded norm.

    Input: this rank's (..., width / tp) slice, a plain tensor (ColwiseParallel's local output).
    """

    def __init__(self, norm: nn.RMSNorm, mesh: DeviceMesh):
        super().__init__()
        (self.full_width,) = norm.normalized_shape
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        self.mesh = mesh
        self.weight = nn.Parameter(distribute_tensor(norm.weight, mesh, [Shard(0)]))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sum_sq = _SumOverRanks.apply(xf.pow(2).sum(-1, keepdim=True), self.mesh)
        y = xf * torch.rsqrt(sum_sq / self.full_width + self.eps)
        return (y * self.weight.to_local().float()).type_as(x)

    def extra_repr(self) -> str:
        return f"{self.full_width} (sharded over tp {self.mesh.size()}), eps={self.eps}"


def enable_async_tp(tp_mesh: DeviceMesh) -> None:
    """Let inductor overlap TP collectives with matmuls (micro-pipelining over symmetric memory); CUDA only
    (trainer/checks.py)."""
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    torch._inductor.config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)
