"""Token dispatch primitives of a mixture-of-experts layer, shared by the in-process and expert-parallel paths.

Assignments (token, slot) are sorted by expert so each expert's rows are contiguous for the grouped matmul,
and the outputs are put back in token order and summed with the router weights. Everything is
differentiable and in a fixed order, so the result does not depend on where the experts live.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate


def local_weight(w: torch.Tensor) -> torch.Tensor:
    """A parameter as a local tensor. Expert-parallel weights are Shard(0) over the experts; replicated mesh
    dims (tensor parallel) hold ranks that route different tokens, so their gradients are partial sums."""
    if not isinstance(w, DTensor):
        return w
    return w.to_local(grad_placements=[Partial() if isinstance(p, Replicate) else p for p in w.placements])


class ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def combine(ys: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Expert outputs (sorted by expert) back in token order, each token's top_k outputs summed by weight."""
    n_tokens, k = weights.shape
    unsorted = ys.new_empty(ys.shape).index_copy(0, order, ys)
    return (unsorted.view(n_tokens, k, -1) * weights.unsqueeze(-1).to(ys.dtype)).sum(1)


def sort_by_expert(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, slot) assignments sorted by expert (stable: token order within an expert), and the count
    per expert."""
    flat = indices.reshape(-1)
    return torch.argsort(flat, stable=True), torch.bincount(flat, minlength=num_experts)


class LocalDispatch:
    """Every expert lives in this process."""

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                 experts: nn.Module) -> torch.Tensor:
        order, counts = sort_by_expert(indices, experts.w1.shape[0])
        ys = experts(x[order // indices.shape[1]], counts)
        return combine(ys, order, weights)
