"""Causal attention from explicit scores, one block of query rows at a time, for short float32 sequences on CPU.

torch's CPU flash kernel multiplies (rows x head_dim) by (head_dim x keys) tiles with head_dim as the inner
dimension and recomputes the probabilities in backward; at the sequence lengths CPU runs use (a few hundred
tokens) that made attention a third of a step, at under half the rate of the model's matmuls. Here each block
of 64 query rows meets only the keys up to its own end (the causal triangle plus one diagonal block, the only
one masked) as batched matmuls, with the query heads that share a K/V head stacked into one matrix (GQA: more
rows per matmul, K/V never repeated); its probabilities are kept for backward, and backward accumulates the K/V
gradients block by block: forward + backward 1.5x-1.7x the flash kernel's speed at seq 512 (docs/performance.md). The
price is memory, about B * H * S * S / 2 floats, so only calls whose kept probabilities stay under
`MAX_KEPT_BYTES` take it. Values agree with SDPA's to float32 rounding (a test bounds both against float64).
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

__all__ = ["BLOCK", "MAX_KEPT_BYTES", "causal_attention_cpu", "explicit_causal_eligible"]

BLOCK = 64  # query rows per block: 32-128 measured within a few percent at seq 512; 64 best
MAX_KEPT_BYTES = 64 << 20  # the probabilities one call (one layer) keeps for backward
MAX_SEQ = 1024  # beyond this the flash kernel catches up (1.07x at 1024) while the memory grows as S^2


def explicit_causal_eligible(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Eager float32 CPU tensors short enough that the kept probabilities stay small, where SDPA would have
    taken its flash kernel (an enclosing `sdpa_kernel` that rules flash out, e.g. math only, is obeyed)."""
    if torch.compiler.is_compiling() or isinstance(q, DTensor) or isinstance(k, DTensor):
        return False
    if q.device.type != "cpu" or q.dtype != torch.float32 or k.dtype != torch.float32:
        return False
    if not torch.backends.cuda.flash_sdp_enabled():  # the flag sdpa_kernel sets for CPU's flash kernel too
        return False
    b, h, s, _ = q.shape
    return s <= MAX_SEQ and k.shape[2] == s and b * h * s * (s + BLOCK) * 2 <= MAX_KEPT_BYTES


def _grouped(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """(B, H, S, D) -> (B * Hkv, S * rep, D): the rep query heads of each K/V head together, position-major
    (row pos * rep + r), so a block of positions is one contiguous run of rows."""
    b, h, s, d = x.shape
    grouped = torch.empty(b, hkv, s, h // hkv, d, dtype=x.dtype)
    grouped.copy_(x.view(b, hkv, h // hkv, s, d).transpose(2, 3))
    return grouped.view(b * hkv, s * (h // hkv), d)


def _ungrouped(x: torch.Tensor, b: int, h: int) -> torch.Tensor:
    """The inverse of _grouped, laid out as (B, S, H, D) in memory: the model transposes it to that next."""
    hkv, d = x.shape[0] // b, x.shape[2]
    s = x.shape[1] * hkv // h
    out = torch.empty(b, s, h, d, dtype=x.dtype)
    out.view(b, s, hkv, h // hkv, d).copy_(x.view(b, hkv, s, h // hkv, d).transpose(1, 2))
    return out.transpose(1, 2)


def _causal_bias(start: int, end: int, rep: int, dtype: torch.dtype) -> torch.Tensor:
    """(rows * rep, end) additive mask of a block of grouped query rows: -inf on the keys after each row's
    position. An additive bias rather than a masked_fill_ of the product: selective activation checkpointing
    hands back the very tensors a matmul returned, which must not have been changed."""
    bias = torch.zeros(end - start, end, dtype=dtype)
    bias[:, start:].masked_fill_(torch.ones(end - start, end - start, dtype=torch.bool).triu_(1), float("-inf"))
    return bias.repeat_interleave(rep, dim=0) if rep > 1 else bias


class _CausalAttentionCPU(torch.autograd.Function):
    """The query heads that share a K/V head go through each block together (_grouped): rep times the rows
    against the same keys per matmul, and K/V are never repeated up to the query heads."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, s, d = q.shape
        hkv = k.shape[1]
        rep = h // hkv
        qs = _grouped(q, hkv).mul_(d ** -0.5)
        k, v = k.reshape(b * hkv, s, d), v.reshape(b * hkv, s, d)
        out = torch.empty_like(qs)
        probs = []
        for start in range(0, s, BLOCK):
            end = min(start + BLOCK, s)
            rows = slice(start * rep, end * rep)
            scores = torch.baddbmm(_causal_bias(start, end, rep, q.dtype), qs[:, rows], k[:, :end].transpose(1, 2))
            p = torch.softmax(scores, dim=-1)
            out[:, rows] = torch.bmm(p, v[:, :end])
            probs.append(p)
        ctx.save_for_backward(qs, k, v, out, *probs)
        return _ungrouped(out, b, h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qs, k, v, out, *probs = ctx.saved_tensors
        b, h, s, d = grad.shape
        hkv = k.shape[0] // b
        rep = h // hkv
        g = _grouped(grad, hkv)
        delta = (g * out).sum(-1, keepdim=True)  # rowsum(dO * O): the softmax backward's per-row term
        dq, dk, dv = torch.empty_like(qs), torch.zeros_like(k), torch.zeros_like(v)
        for p, start in zip(probs, range(0, s, BLOCK)):
            end = min(start + BLOCK, s)
            rows = slice(start * rep, end * rep)
            g_rows = g[:, rows]
            # A fresh product added to the K/V gradients' rows: baddbmm_ into such a slice (not contiguous)
            # falls back to one small matmul per batch entry.
            dv[:, :end] += torch.bmm(p.transpose(1, 2), g_rows)
            ds = torch.bmm(g_rows, v[:, :end].transpose(1, 2)).sub_(delta[:, rows]).mul_(p)
            dq[:, rows] = torch.bmm(ds, k[:, :end])
            dk[:, :end] += torch.bmm(ds.transpose(1, 2), qs[:, rows])  # qs carries the scale already
        dq.mul_(d ** -0.5)
        return _ungrouped(dq, b, h), dk.view(b, hkv, s, d), dv.view(b, hkv, s, d)


def causal_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v for (B, H, S, D) q and (B, Hkv, S, D) k, v (H a multiple of Hkv)."""
    return _CausalAttentionCPU.apply(q, k, v)
