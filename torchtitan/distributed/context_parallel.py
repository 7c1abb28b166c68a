"""Context parallel: the sequence is split over the "cp" mesh dim; attention sees all keys, block by block.

Each CP rank holds S / cp tokens of every sequence. Causal attention makes late
tokens costlier than early ones, so the sequence is cut into 2 x cp chunks and
rank i takes chunks i and 2cp-1-i (one cheap, one expensive): every rank then
does the same attention work. Positions travel with the tokens so RoPE uses
global token positions.

Attention is blockwise (ops/blockwise.py): each (query chunk, key chunk) pair is
computed by a kernel that returns the log-sum-exp, the pairs merge with an online
softmax, pairs no query sees are skipped, and no mask exists unless a window edge
or a document boundary crosses a pair (then that pair's mask only). K/V reach the
other ranks one of two ways (parallelism.context_parallel_rotate_method):
- alltoall: a ring. At step s a rank computes with the K/V piece of rank r - s
  while it sends that piece on and receives the next (point-to-point). A rank
  holds its own K/V and one piece in flight: attention state is O(S / cp). The
  backward runs the ring again and the K/V gradients travel with their piece
  back to its owner.
- allgather: K and V gathered once per layer (differentiable all-gather whose
  backward reduce-scatters the gradients), then the same blockwise pairs. Fewer,
  larger messages; the layer's whole K/V is held for its backward.

torch's experimental `context_parallel` is not used: it has no CPU sharding
strategy (docs/debugging.md, "torch.distributed on CPU (gloo): what works and
what does not") and shards the batch itself inside a context manager, which
would bypass `shard_sequence`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from torchtitan.ops.attention import CAUSAL, AttentionCore, AttentionMask
from torchtitan.ops.blockwise import BlockPlan, Span, blockwise_attention

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
                         f" (trainer/checks.py rejects such configs)")
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

    Functional collectives return an AsyncCollectiveTensor that waits at first use, so K and V would be in
    flight together on the cp group. On gloo that corrupts the heap (a rank aborts with
    "malloc(): unaligned tcache chunk detected" or SIGSEGV, a few steps in): ProcessGroupGloo runs a group's
    collectives on several worker threads, and each thread, after its collective, assigns
    `pgStatus_->lastCompletedWorkName` (a std::string longer than the small-string buffer, e.g.
    "ALLGATHER_COALESCED") outside the group's lock (ProcessGroupGloo::runLoop, torch 2.11-2.13); two collectives
    finishing together free the old string twice. One collective in flight per group avoids it, and costs
    nothing here: attention needs both before it starts. The wait runs under no_grad and its result is
    dropped, so the autograd graph is the one it was.
    """
    if isinstance(t, funcol.AsyncCollectiveTensor):
        with torch.no_grad():
            t.wait()


def _exchange(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """Every rank's `x` concatenated in rank order along `dim`; differentiable (backward: reduce-scatter)."""
    x = x.movedim(dim, 0).contiguous()
    out = _all_gather_autograd(x, 0, group)
    _wait_now(out)
    if _OLD_FUNCOL:  # torch 2.13's backwards take any layout: leave its graph as it was
        out = _ContiguousGrad.apply(out)
    return out.movedim(0, dim)


class P2PRing:
    """Passes tensors to the next rank of the cp group and receives the previous rank's (point-to-point).

    Sends and receives do not go through gloo's collective worker threads, so several may be in flight on
    one group (unlike collectives there, see `_wait_now`)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start(self, tensors: list[torch.Tensor]) -> tuple[list, list[torch.Tensor], list[torch.Tensor]]:
        sent = [t.contiguous() for t in tensors]  # kept alive until the sends complete
        received = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag=i) for i, t in enumerate(sent)]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group, tag=i) for i, r in enumerate(received)]
        return dist.batch_isend_irecv(ops), sent, received

    def finish(self, pending: tuple[list, list[torch.Tensor], list[torch.Tensor]]) -> list[torch.Tensor]:
        works, _, received = pending
        for work in works:
            work.wait()
        return received


def rank_spans(cp_size: int, rank: int, chunk: int, offset: int = 0) -> tuple[Span, Span]:
    """The two chunks rank `rank` holds, as spans of global positions, laid out from `offset` locally."""
    first, second = chunk_ids(cp_size, rank)
    return Span(first * chunk, chunk, offset), Span(second * chunk, chunk, offset + chunk)


class ContextParallelAttention(AttentionCore):
    """Drop-in for the model's attention core when the sequence is sharded over `group` (shard_sequence)."""

    traceable = False  # torch.compile leaves it eager (distributed/compile.py)

    def __init__(self, group: dist.ProcessGroup, rotate_method: str, mask: AttentionMask = CAUSAL,
                 backend: str = "default"):
        super().__init__(mask, backend)
        self.group, self.rotate_method = group, rotate_method
        self.cp_size, self.cp_rank = dist.get_world_size(group), dist.get_rank(group)
        self.ring = P2PRing(group) if rotate_method == "alltoall" else None

    @torch.compiler.disable  # point-to-point messages inside an autograd.Function: run eagerly
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                documents: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        chunk = q.shape[2] // 2
        q_spans = rank_spans(self.cp_size, self.cp_rank, chunk)
        if self.ring is not None:
            kv_spans = tuple(rank_spans(self.cp_size, (self.cp_rank - s) % self.cp_size, chunk)
                             for s in range(self.cp_size))
            return blockwise_attention(q, k, v, BlockPlan(self.mask, q_spans, kv_spans, self.ring), documents, sinks)
        k = _exchange(k, self.group, dim=2)
        v = _exchange(v, self.group, dim=2)
        kv_spans = tuple(span for r in range(self.cp_size)
                         for span in rank_spans(self.cp_size, r, chunk, offset=2 * chunk * r))
        return blockwise_attention(q, k, v, BlockPlan(self.mask, q_spans, (kv_spans,)), documents, sinks)

    def extra_repr(self) -> str:
        return f"cp={self.cp_size}, rotate_method={self.rotate_method}, {super().extra_repr()}"


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh, rotate_method: str) -> None:
    """Replace every block's `attention.sdpa` with a context-parallel one over `cp_mesh`."""
    group = cp_mesh.get_group()
    for block in model.layers.values():
        core: AttentionCore = block.attention.sdpa
        block.attention.sdpa = ContextParallelAttention(group, rotate_method, core.mask, core.backend)
