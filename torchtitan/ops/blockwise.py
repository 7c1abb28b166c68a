"""Attention block pair by block pair, merged by log-sum-exp, with a backward of the same memory bound.

The sequence is cut into spans (a context-parallel rank's two chunks, or tiles of
a local sequence). Each (query span, key span) pair is one of: skipped (no query
sees any key), full, causal (the same span on both sides) or masked (a sliding
window's edge or a document boundary crosses it). Full and causal pairs run the
fused kernels without a mask; a masked pair builds the mask of that pair only, so
nothing of size (S x S) exists. Pair outputs merge with an online softmax:
out = sum_i exp(lse_i - lse) out_i, lse = logsumexp_i lse_i. Attention sinks (a learned logit per head
in every softmax denominator) are a last block of value zero and log-sum-exp the sink.

The backward recomputes pair by pair from the merged output and log-sum-exp
(P = exp(QK^T - lse) of a pair is its share of the global softmax), so it keeps
no per-pair activations. Key/value spans may arrive from other ranks: a `Ring`
(distributed/context_parallel.py) hands the next piece over while the current
one is computed, and carries the key/value gradients back to their owners.

Kernels: on CPU torch's flash kernel (it takes an additive mask and returns the
log-sum-exp); on CUDA the flash kernel for full and causal pairs in 16-bit, and
the math kernel below for masked pairs and float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from torchtitan.ops.masks import AttentionMask

SKIP, FULL, CAUSAL_PAIR, MASKED = "skip", "full", "causal", "masked"


@dataclass(frozen=True)
class Span:
    """Global token positions [start, start + length) of one block; `offset` is where it sits locally."""

    start: int
    length: int
    offset: int

    @property
    def last(self) -> int:
        return self.start + self.length - 1

    def rows(self) -> slice:
        return slice(self.offset, self.offset + self.length)


def pair_kind(mask: AttentionMask, q: Span, k: Span, documents: bool) -> str:
    """How the (q, k) block pair is computed, from positions alone (no look at the data, no host sync).

    With document masking every pair a position rule keeps is masked: which documents a block holds is data.
    """
    if k.start > q.last:
        return SKIP
    if mask.window is not None and q.start - k.last >= mask.window:
        return SKIP
    if documents:
        return MASKED
    in_window = mask.window is None or q.last - k.start < mask.window
    if k.last <= q.start and in_window:
        return FULL
    if (q.start, q.length) == (k.start, k.length) and in_window:
        return CAUSAL_PAIR
    return MASKED


def pair_allowed(mask: AttentionMask, q: Span, k: Span, documents: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    """(B or 1, 1, Lq, Lk) booleans of one block pair; documents: (B, S) document ids of the whole sequence."""
    q_pos = torch.arange(q.start, q.start + q.length, device=device).unsqueeze(0)
    k_pos = torch.arange(k.start, k.start + k.length, device=device).unsqueeze(0)
    ok = mask.allowed(q_pos, k_pos)
    if documents is not None:
        q_doc = documents[:, q.start:q.start + q.length]
        k_doc = documents[:, k.start:k.start + k.length]
        ok = ok & (q_doc[:, None, :, None] == k_doc[:, None, None, :])
    return ok


class Ring(Protocol):
    """Passes a list of tensors to the next rank of a ring and receives the previous rank's."""

    size: int
    rank: int

    def start(self, tensors: list[torch.Tensor]) -> object: ...

    def finish(self, pending: object) -> list[torch.Tensor]: ...


# ---------------------------------------------------------------- kernels: (out, lse) and their backward
def _math_scores(q, k, kind, bias, scale):
    acc = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    if kind == CAUSAL_PAIR:
        n = s.shape[-1]
        return s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s if bias is None else s + bias


def _math_forward(q, k, v, kind, bias, scale):
    """Reference kernel on any device: exact, holds one pair's scores at a time."""
    s = _math_scores(q, k, kind, bias, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    return (p @ v.to(p.dtype)).to(q.dtype), lse, None


def _math_backward(dout, q, k, v, out, lse, kind, bias, scale, extra):
    s = _math_scores(q, k, kind, bias, scale)
    p = torch.exp(s - lse.unsqueeze(-1))
    do = dout.to(p.dtype)
    dv = p.transpose(-1, -2) @ do
    dp = do @ v.to(p.dtype).transpose(-1, -2)
    ds = p * (dp - (do * out.to(p.dtype)).sum(-1, keepdim=True))
    dq = (ds @ k.to(p.dtype)) * scale
    dk = (ds.transpose(-1, -2) @ q.to(p.dtype)) * scale
    return dq, dk, dv


def _cpu_forward(q, k, v, kind, bias, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, kind == CAUSAL_PAIR, attn_mask=bias, scale=scale)
    return out, lse, None


def _cpu_backward(dout, q, k, v, out, lse, kind, bias, scale, extra):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, kind == CAUSAL_PAIR, attn_mask=bias, scale=scale)


def _cuda_flash_forward(q, k, v, kind, bias, scale):
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, kind == CAUSAL_PAIR, False, scale=scale)
    return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)


def _cuda_flash_backward(dout, q, k, v, out, lse, kind, bias, scale, extra):
    # The forward's sequence offsets and RNG state of a pair of this shape (no dropout: they do not vary).
    cum_q, cum_k, max_q, max_k, seed, offset = extra
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, kind == CAUSAL_PAIR, seed, offset, scale=scale)


@dataclass(frozen=True)
class Kernel:
    """Which implementation computes a pair: "cpu" (torch's CPU flash), "flash" (CUDA) or "math"."""

    name: str

    def forward(self, q, k, v, kind, bias, scale):
        impl = {"cpu": _cpu_forward, "flash": _cuda_flash_forward, "math": _math_forward}[self._for(kind)]
        return impl(q, k, v, kind, bias, scale)

    def backward(self, dout, q, k, v, out, lse, kind, bias, scale, extra):
        impl = {"cpu": _cpu_backward, "flash": _cuda_flash_backward, "math": _math_backward}[self._for(kind)]
        return impl(dout, q, k, v, out, lse, kind, bias, scale, extra)

    def _for(self, kind: str) -> str:
        return "math" if self.name == "flash" and kind == MASKED else self.name


def kernel_for(q: torch.Tensor) -> Kernel:
    """torch's CPU flash kernel on CPU; flash (16-bit) or math on CUDA; math elsewhere."""
    if q.device.type == "cpu":
        return Kernel("cpu")
    head_dim = q.shape[-1]
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 \
            and head_dim <= 256:  # what the flash kernel takes
        return Kernel("flash")
    return Kernel("math")


# ---------------------------------------------------------------- the plan and the autograd function
@dataclass(frozen=True)
class BlockPlan:
    """Static description of one attention call: this rank's query spans and, per ring step, the key spans
    of the piece it holds then (ring None: one local step)."""

    mask: AttentionMask
    q_spans: tuple[Span, ...]
    kv_spans: tuple[tuple[Span, ...], ...]
    ring: Ring | None = None
    kernel: Kernel | None = None

    def pairs(self, step: int, documents: bool):
        for k_span in self.kv_spans[step]:
            for q_span in self.q_spans:
                kind = pair_kind(self.mask, q_span, k_span, documents)
                if kind != SKIP:
                    yield q_span, k_span, kind


def _bias(plan: BlockPlan, q_span: Span, k_span: Span, kind: str, documents, q: torch.Tensor):
    """The additive mask of a masked pair and which of its query rows see any key (None, None otherwise)."""
    if kind != MASKED:
        return None, None
    ok = pair_allowed(plan.mask, q_span, k_span, documents, q.device)
    dtype = torch.promote_types(q.dtype, torch.float32) if plan.kernel.name == "math" else q.dtype
    bias = torch.zeros(ok.shape, dtype=dtype, device=q.device).masked_fill_(~ok, float("-inf"))
    return bias, ok.any(-1)


def _expand_heads(t: torch.Tensor, rep: int) -> torch.Tensor:
    return t if rep == 1 else t.repeat_interleave(rep, dim=1)


def _fold_heads(g: torch.Tensor, rep: int) -> torch.Tensor:
    """Gradient w.r.t. grouped K/V heads from the gradient w.r.t. their repeated copies."""
    if rep == 1:
        return g
    b, h, s, d = g.shape
    return g.view(b, h // rep, rep, s, d).sum(2)


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold one block's (out, lse) into the running ones, in place; rows no key reached stay -inf."""
    new = torch.logaddexp(lse, block_lse)
    finite = torch.isfinite(new)
    w_old = torch.where(finite, torch.exp(lse - new), 0.0)
    w_new = torch.where(finite, torch.exp(block_lse - new), 0.0)
    out.mul_(w_old.unsqueeze(-1)).add_(torch.where(w_new.unsqueeze(-1) > 0, block_out.to(out.dtype), 0.0)
                                       * w_new.unsqueeze(-1))
    lse.copy_(new)


class BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, documents, plan: BlockPlan, sinks):
        scale = q.shape[-1] ** -0.5
        rep = q.shape[1] // k.shape[1]
        b, h, sq, d = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
        out = torch.zeros(b, h, sq, d, dtype=acc, device=q.device)
        lse = torch.full((b, h, sq), float("-inf"), dtype=acc, device=q.device)
        has_docs = documents is not None
        extras: dict = {}  # a kernel's per-shape forward state its backward needs (CUDA flash)
        piece = [k, v]
        steps = len(plan.kv_spans)
        for step in range(steps):
            pending = plan.ring.start(piece) if step + 1 < steps else None
            pk, pv = piece
            for q_span, k_span, kind in plan.pairs(step, has_docs):
                rows, cols = q_span.rows(), k_span.rows()
                bias, rows_ok = _bias(plan, q_span, k_span, kind, documents, q)
                o, l_, extra = plan.kernel.forward(q[:, :, rows], _expand_heads(pk[:, :, cols], rep),
                                                   _expand_heads(pv[:, :, cols], rep), kind, bias, scale)
                extras.setdefault((q_span.length, k_span.length, kind), extra)
                if rows_ok is not None:
                    l_ = l_.masked_fill(~rows_ok, float("-inf"))
                _merge(out[:, :, rows], lse[:, :, rows], o, l_)
            if pending is not None:
                piece = plan.ring.finish(pending)
        if sinks is not None:
            # A learned logit per head in every row's softmax denominator: a key with value zero, merged last.
            sink = sinks.to(acc).view(1, h, 1).expand(b, h, sq)
            _merge(out, lse, torch.zeros_like(out), sink.contiguous())
        out = out.to(q.dtype)
        # Rows that saw no key (none in practice: a token always sees itself) keep out = 0 and get lse = 0,
        # so the backward's exp(s - lse) is 0 for their masked scores rather than nan.
        lse = torch.where(torch.isfinite(lse), lse, 0.0)
        ctx.save_for_backward(q, k, v, out, lse, documents, sinks)
        ctx.plan, ctx.extras = plan, extras
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, documents, sinks = ctx.saved_tensors
        plan: BlockPlan = ctx.plan
        scale = q.shape[-1] ** -0.5
        rep = q.shape[1] // k.shape[1]
        dout = dout.contiguous()
        acc = lse.dtype
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        piece = [k, v]
        grads = [torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)]
        steps = len(plan.kv_spans)
        for step in range(steps):
            pending = plan.ring.start(piece) if step + 1 < steps else None
            pk, pv = piece
            for q_span, k_span, kind in plan.pairs(step, documents is not None):
                rows, cols = q_span.rows(), k_span.rows()
                bias, _ = _bias(plan, q_span, k_span, kind, documents, q)
                gq, gk, gv = plan.kernel.backward(
                    dout[:, :, rows].contiguous(), q[:, :, rows].contiguous(),
                    _expand_heads(pk[:, :, cols], rep).contiguous(), _expand_heads(pv[:, :, cols], rep).contiguous(),
                    out[:, :, rows].contiguous(), lse[:, :, rows].contiguous(), kind, bias, scale,
                    ctx.extras.get((q_span.length, k_span.length, kind)))
                dq[:, :, rows] += gq
                grads[0][:, :, cols] += _fold_heads(gk.to(acc), rep)
                grads[1][:, :, cols] += _fold_heads(gv.to(acc), rep)
            if plan.ring is not None:
                # The gradients of the piece held now go on with it; after the last step they reach its owner.
                grads = plan.ring.finish(plan.ring.start(grads))
            if pending is not None:
                piece = plan.ring.finish(pending)
        dsinks = None
        if sinks is not None:
            # The sink is a key of value zero: d logit = p_sink (0 - rowsum(dout * out)), summed over the rows.
            p_sink = torch.exp(sinks.to(acc).view(1, -1, 1) - lse)
            dsinks = -(p_sink * (dout.to(acc) * out.to(acc)).sum(-1)).sum((0, 2)).to(sinks.dtype)
        return dq.to(q.dtype), grads[0].to(k.dtype), grads[1].to(v.dtype), None, None, dsinks


def blockwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan,
                        documents: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of (B, H, Sq, D) queries over (B, Hkv, Sk, D) keys/values (grouped heads allowed) by `plan`.
    sinks: (H,) learned logits, one per head, added to every row's softmax denominator (gpt-oss)."""
    if plan.kernel is None:
        plan = BlockPlan(plan.mask, plan.q_spans, plan.kv_spans, plan.ring, kernel_for(q))
    # No .contiguous() here: the inputs are views of RoPE's outputs (heads transposed), which autograd keeps
    # anyway; a copy would be saved a second time. Kernels take strided inputs; sends copy what they send.
    return BlockwiseAttention.apply(q, k, v, documents, plan, sinks)


def tiles(seq_len: int, tile: int) -> tuple[Span, ...]:
    """A local sequence cut into tiles of `tile` tokens (the last may be shorter)."""
    return tuple(Span(s, min(tile, seq_len - s), s) for s in range(0, seq_len, tile))
