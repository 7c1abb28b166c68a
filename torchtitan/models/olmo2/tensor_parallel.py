"""OLMo 2 tensor/sequence parallel plan, including the full-width QK-norm.

Megatron-style like the Llama plan: the residual stream is sequence-sharded
between blocks, attention and MLP gather the sequence on entry and
reduce-scatter on exit, heads and hidden units are split across ranks.

Two things differ from Llama:

- The norms sit after attention and after the MLP, on the residual branch.
  They run sequence-parallel and hand back plain local tensors, so the
  residual add sees two plain (B, S/tp, D) tensors.
- q_norm / k_norm normalize the *whole* q (k) projection, but under TP each
  rank only holds its heads' slice of it. Gathering q and k to normalize them
  (what transformers' TP plan does) costs two all-gathers of (B, S, width) per
  layer and recomputes every head everywhere. Instead each rank sums the squares
  of its slice and one all-reduce of a (B, S, 1) tensor gives the full-width
  mean square; each rank then scales its own slice by its slice of the weight
  (the weight is sharded like the heads). The result equals the unsharded norm.
"""
from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from torchtitan.models.llama3.tensor_parallel import _outer_plan, enable_async_tp


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

    Input: this rank's (..., width / tp) slice, a plain tensor (ColwiseParallel's local output).
    The weight is a DTensor sharded the same way, so checkpoints hold the full-width weight.
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


def _block_plan() -> dict:
    return {
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                        desired_input_layouts=(Replicate(), None, None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "post_attention_norm": SequenceParallel(use_local_output=True),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
        "post_ffn_norm": SequenceParallel(use_local_output=True),
    }


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool, async_tp: bool) -> None:
    """Shard `model` in place over `tp_mesh`; pipeline stages work too (missing pieces are skipped)."""
    parallelize_module(model, tp_mesh, _outer_plan(model, loss_parallel))
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, _block_plan())
        attn = block.attention
        attn.q_norm = HeadShardedRMSNorm(attn.q_norm, tp_mesh)
        attn.k_norm = HeadShardedRMSNorm(attn.k_norm, tp_mesh)
    if async_tp:
        enable_async_tp(tp_mesh)
