"""Causal attention from explicit scores, one block of query rows at a time, for short float32 sequences on CPU.

torch's CPU flash kernel multiplies (rows x head_dim) by (head_dim x keys) tiles with head_dim as the inner
dimension and recomputes the probabilities in backward; at the sequence lengths CPU runs use (a few hundred
tokens) that made attention a third of a step, at under half the rate of the model's matmuls. Here each block
of 64 query rows meets only the keys up to its own end (the causal triangle plus one diagonal block, the only
one masked) as batched matmuls, its probabilities are kept for backward, and backward accumulates the K/V
gradients in place: forward + backward 1.5x the flash kernel's speed at seq 512 (docs/performance.md). The
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


class _CausalAttentionCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, s, d = q.shape
        rep = h // k.shape[1]
        if rep > 1:  # K/V are small beside the scores: repeating them costs less than regrouping the queries
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        qs = (q * d ** -0.5).reshape(b * h, s, d)
        k, v = k.reshape(b * h, s, d), v.reshape(b * h, s, d)
        out = torch.empty_like(qs)
        probs = []
        for start in range(0, s, BLOCK):
            end = min(start + BLOCK, s)
            # The mask enters as an additive bias rather than a masked_fill_ of the product: selective activation
            # checkpointing hands back the very tensors a matmul returned, which must not have been changed.
            bias = torch.zeros(end - start, end, dtype=q.dtype)
            bias[:, start:].masked_fill_(torch.ones(end - start, end - start, dtype=torch.bool).triu_(1),
                                         float("-inf"))
            scores = torch.baddbmm(bias, qs[:, start:end], k[:, :end].transpose(1, 2))
            p = torch.softmax(scores, dim=-1)
            out[:, start:end] = torch.bmm(p, v[:, :end])
            probs.append(p)
        ctx.save_for_backward(qs, k, v, out, *probs)
        ctx.rep = rep
        return out.view(b, h, s, d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qs, k, v, out, *probs = ctx.saved_tensors
        bh, s, d = qs.shape
        g = grad.reshape(bh, s, d)
        delta = (g * out).sum(-1, keepdim=True)  # rowsum(dO * O): the softmax backward's per-row term
        dq, dk, dv = torch.empty_like(qs), torch.zeros_like(k), torch.zeros_like(v)
        for p, start in zip(probs, range(0, s, BLOCK)):
            end = min(start + BLOCK, s)
            g_rows = g[:, start:end]
            dv[:, :end].baddbmm_(p.transpose(1, 2), g_rows)
            ds = torch.bmm(g_rows, v[:, :end].transpose(1, 2)).sub_(delta[:, start:end]).mul_(p)
            dq[:, start:end] = torch.bmm(ds, k[:, :end])
            dk[:, :end].baddbmm_(ds.transpose(1, 2), qs[:, start:end])  # qs carries the scale already
        dq.mul_(d ** -0.5)
        h = grad.shape[1]
        shape = (grad.shape[0], h // ctx.rep, ctx.rep, s, d)
        dk, dv = dk.view(shape).sum(2), dv.view(shape).sum(2)
        return dq.view(grad.shape), dk, dv


def causal_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v for (B, H, S, D) q and (B, Hkv, S, D) k, v (H a multiple of Hkv)."""
    return _CausalAttentionCPU.apply(q, k, v)
