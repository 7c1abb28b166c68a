"""Context parallel: the sequence is split over the "cp" mesh dim; attention sees all keys.

Each CP rank holds S / cp tokens of every sequence. Causal attention makes late
tokens costlier than early ones, so the sequence is cut into 2 x cp chunks and
rank i takes chunks i and 2cp-1-i (one cheap, one expensive): every rank then
does the same attention work. Positions travel with the tokens so RoPE and the
causal mask use global token positions.

Attention gathers K and V (and their positions) over the cp group with
autograd-aware functional collectives, whose backward reduce-scatters the K/V
gradients back to their owners, then runs SDPA with the mask the replaced core
defines by position (ops/attention.py; causal: key_pos <= query_pos). Exact on every
device and under torch.compile; the cost
is a (S/cp x S) mask per sequence and the full K/V on every rank (see
docs/parallelism.md, "Context parallel", for the trade-offs and what a faster
CUDA path would need).

torch's experimental `context_parallel` is not used: it has no CPU sharding
strategy (shared/TORCH_ON_CPU.md) and shards the batch itself inside a context
manager, which would bypass `shard_sequence`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from torchtitan.ops.attention import CAUSAL, AttentionCore, AttentionMask, attend
from torchtitan.tools.errors import ConfigError

ROTATE_METHODS = ("allgather", "alltoall")


def chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two of the 2 x cp sequence chunks that `cp_rank` holds, in the order it holds them."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def shard_sequence(inputs: torch.Tensor, labels: torch.Tensor, cp_size: int,
                   cp_rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's load-balanced share of (B, S) inputs and labels, and their global positions (B, S / cp)."""
    bsz, seqlen = inputs.shape[:2]
    if seqlen % (2 * cp_size):
        raise ValueError(f"sequence length {seqlen} is not divisible by 2 x context_parallel_degree = {2 * cp_size}"
                         f" (preflight rejects such configs)")
    chunk = seqlen // (2 * cp_size)
    first, second = chunk_ids(cp_size, cp_rank)
    idx = torch.cat([torch.arange(first * chunk, (first + 1) * chunk),
                     torch.arange(second * chunk, (second + 1) * chunk)]).to(inputs.device)
    positions = idx.unsqueeze(0).expand(bsz, -1).contiguous()
    return inputs.index_select(1, idx), labels.index_select(1, idx), positions


# torch 2.13 renamed the differentiable all-gather (the old name warns there); torch 2.11 has only the old one.
_OLD_FUNCOL = not hasattr(funcol, "all_gather_single_autograd")
_all_gather_autograd = funcol.all_gather_tensor_autograd if _OLD_FUNCOL else funcol.all_gather_single_autograd


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: torch 2.11's collective backwards require one,
    and the gradient of the `movedim` after the exchange is a permuted view."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _wait_now(t: torch.Tensor) -> None:
    """Block until the functional collective that produced `t` has finished; `t` and its graph are unchanged.

    Functional collectives return an AsyncCollectiveTensor that waits at first use, so K, V and the positions
    used to be in flight together on the cp group. On gloo that corrupts the heap (a rank aborts with
    "malloc(): unaligned tcache chunk detected" or SIGSEGV, a few steps in): ProcessGroupGloo runs a group's
    collectives on several worker threads, and each thread, after its collective, assigns
    `pgStatus_->lastCompletedWorkName` (a std::string longer than the small-string buffer, e.g.
    "ALLGATHER_COALESCED") outside the group's lock (ProcessGroupGloo::runLoop, torch 2.11-2.13); two collectives
    finishing together free the old string twice. One collective in flight per group avoids it, and costs
    nothing here: attention needs all three before it starts. The wait runs under no_grad and its result is
    dropped, so the autograd graph is the one it was.
    """
    if isinstance(t, funcol.AsyncCollectiveTensor):
        with torch.no_grad():
            t.wait()


def _exchange(x: torch.Tensor, group: dist.ProcessGroup, method: str, dim: int) -> torch.Tensor:
    """Every rank's `x` concatenated in rank order along `dim`; differentiable.

    allgather: one all-gather (backward: reduce-scatter). alltoall: each rank sends
    its block to every rank through all_to_all_single (backward: the reverse
    all-to-all, then the copies' gradients are summed). Same result, different
    collective: all-to-all is the primitive some fabrics/backends schedule better.
    """
    size = dist.get_world_size(group)
    x = x.movedim(dim, 0).contiguous()
    if method == "allgather":
        out = _all_gather_autograd(x, 0, group)
    else:
        n = x.shape[0]
        out = funcol.all_to_all_single_autograd(x.repeat(size, *([1] * (x.dim() - 1))), [n] * size, [n] * size, group)
    _wait_now(out)
    if _OLD_FUNCOL:  # torch 2.13's backwards take any layout: leave its graph as it was
        out = _ContiguousGrad.apply(out)
    return out.movedim(0, dim)


class ContextParallelAttention(AttentionCore):
    """Drop-in for the model's attention core when the sequence is sharded over `group`."""

    def __init__(self, group: dist.ProcessGroup, rotate_method: str, mask: AttentionMask = CAUSAL,
                 backend: str = "default"):
        super().__init__(mask, backend)
        self.group, self.rotate_method = group, rotate_method
        self.cp_size, self.cp_rank = dist.get_world_size(group), dist.get_rank(group)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            raise ValueError("context parallel attention needs the global positions of the local tokens "
                             "(shard the batch with context_parallel.shard_sequence)")
        k = _exchange(k, self.group, self.rotate_method, dim=2)
        v = _exchange(v, self.group, self.rotate_method, dim=2)
        with torch.no_grad():
            k_pos = _exchange(positions, self.group, "allgather", dim=1)
        return attend(q, k, v, self.mask, self.backend, positions, k_pos)

    def extra_repr(self) -> str:
        return f"cp={self.cp_size}, rotate_method={self.rotate_method}, {super().extra_repr()}"


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh, rotate_method: str) -> None:
    """Replace every block's `attention.sdpa` with a context-parallel one over `cp_mesh`."""
    if rotate_method not in ROTATE_METHODS:
        raise ConfigError(f"parallelism.context_parallel_rotate_method = {rotate_method!r}; "
                         f"valid: {', '.join(ROTATE_METHODS)}")
    group = cp_mesh.get_group()
    for block in model.layers.values():
        core: AttentionCore = block.attention.sdpa
        block.attention.sdpa = ContextParallelAttention(group, rotate_method, core.mask, core.backend)
