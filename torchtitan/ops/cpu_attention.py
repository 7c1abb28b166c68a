"""Causal attention from explicit scores, one block of query rows at a time, for short float32 sequences on CPU.

torch's CPU flash kernel multiplies (rows x head_dim) by (head_dim x keys) tiles with head_dim as the inner
dimension and recomputes the probabilities in backward; at the sequence lengths CPU runs use (a few hundred
tokens) that made attention a third of a step, at under half the rate of the model's matmuls. Here each block
of 64 query rows meets only the keys up to its own end (the causal triangle plus one diagonal block, the only
one masked) as batched matmuls, with the query heads that share a K/V head stacked into one matrix (GQA: more
rows per matmul, K/V never repeated); its probabilities are kept for backward, and backward accumulates the K/V
gradients block by block: forward + backward 1.5x-1.7x the flash kernel's speed at seq 512 (docs/performance.md). The
price is memory, about B * H * S * S / 2 floats, so only calls whose kept probabilities stay under
`MAX_KEPT_BYTES` take it. It is a custom op (torch.library, with fake kernels), so torch.compile keeps it as one
call. Values agree with SDPA's to float32 rounding (a test bounds both against float64).
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

__all__ = ["BLOCK", "MAX_KEPT_BYTES", "causal_attention_cpu", "explicit_causal_eligible"]

BLOCK = 64  # query rows per block: 32-128 measured within a few percent at seq 512; 64 best
MAX_KEPT_BYTES = 64 << 20  # the probabilities one call (one layer) keeps for backward
MAX_SEQ = 1024  # beyond this the flash kernel catches up (1.07x at 1024) while the memory grows as S^2


def explicit_causal_eligible(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Float32 CPU tensors (eager or compiled) short enough that the kept probabilities stay small, where SDPA
    would have taken its flash kernel (an enclosing `sdpa_kernel` that rules flash out, e.g. math only, is obeyed
    in eager code)."""
    if isinstance(q, DTensor) or isinstance(k, DTensor):
        return False
    if q.device.type != "cpu" or q.dtype != torch.float32 or k.dtype != torch.float32:
        return False
    # The flag sdpa_kernel sets for CPU's flash kernel too; compiled code cannot read it (dynamo cannot trace the
    # query), so a compiled region takes the explicit scores whatever kernel context encloses it.
    if not torch.compiler.is_compiling() and not torch.backends.cuda.flash_sdp_enabled():
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


def _copied(x: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, S, D) -> a fresh (B * Hkv, S, D): a custom op's outputs may not alias its inputs."""
    b, hkv, s, d = x.shape
    out = torch.empty(b * hkv, s, d, dtype=x.dtype)
    out.view(b, hkv, s, d).copy_(x)
    return out


def _blocks(s: int):
    return [(start, min(start + BLOCK, s)) for start in range(0, s, BLOCK)]


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                        torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(output, grouped scaled queries, K and V as (B * Hkv, S, D), grouped output, each block's probabilities):
    all but the first are what backward reads (K/V copied once, in the layout backward multiplies by). The query
    heads that share a K/V head go through each block together (_grouped): rep times the rows against the same
    keys per matmul, and K/V are never repeated up to the query heads."""
    b, h, s, d = q.shape
    hkv = k.shape[1]
    rep = h // hkv
    qs = _grouped(q, hkv).mul_(d ** -0.5)
    k, v = _copied(k), _copied(v)
    out = torch.empty_like(qs)
    probs = []
    for start, end in _blocks(s):
        rows = slice(start * rep, end * rep)
        scores = torch.baddbmm(_causal_bias(start, end, rep, q.dtype), qs[:, rows], k[:, :end].transpose(1, 2))
        p = torch.softmax(scores, dim=-1)
        out[:, rows] = torch.bmm(p, v[:, :end])
        probs.append(p)
    return _ungrouped(out, b, h), qs, k, v, out, probs


# The same two functions as custom ops, so that torch.compile keeps the attention as one opaque call (its block
# loop is not unrolled into the graph). Eager code calls them through the autograd.Function below instead, which
# skips the op's Python dispatch (about 0.15 ms a call here).
_forward = torch.library.custom_op("torchtitan::cpu_causal_attention", _attention, mutates_args=())


@_forward.register_fake
def _forward_fake(q, k, v):
    b, h, s, d = q.shape
    rep = h // k.shape[1]
    grouped, kv = q.new_empty(b * k.shape[1], s * rep, d), q.new_empty(b * k.shape[1], s, d)
    probs = [q.new_empty(grouped.shape[0], (end - start) * rep, end) for start, end in _blocks(s)]
    return (q.new_empty(b, s, h, d).transpose(1, 2), torch.empty_like(grouped), torch.empty_like(kv),
            torch.empty_like(kv), torch.empty_like(grouped), probs)


def _attention_backward(grad: torch.Tensor, qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        probs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k, v: (B * Hkv, S, D) as the forward returned them."""
    b, h, s, d = grad.shape
    hkv = k.shape[0] // b
    rep = h // hkv
    g = _grouped(grad, hkv)
    delta = (g * out).sum(-1, keepdim=True)  # rowsum(dO * O): the softmax backward's per-row term
    dq, dk, dv = torch.empty_like(qs), torch.zeros_like(k), torch.zeros_like(v)
    for p, (start, end) in zip(probs, _blocks(s)):
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


_backward = torch.library.custom_op("torchtitan::cpu_causal_attention_backward", _attention_backward,
                                    mutates_args=())


@_backward.register_fake
def _backward_fake(grad, qs, k, v, out, probs):
    b, h, s, d = grad.shape
    hkv = k.shape[0] // b
    return grad.new_empty(b, s, h, d).transpose(1, 2), k.new_empty(b, hkv, s, d), v.new_empty(b, hkv, s, d)


def _setup_context(ctx, inputs, output):
    _, qs, k, v, out, probs = output
    ctx.save_for_backward(qs, k, v, out, *probs)
    # The outputs kept for backward get no gradient; without this autograd would hand backward zero tensors the
    # size of the kept probabilities (8 ms a layer at the debug shape).
    ctx.mark_non_differentiable(qs, k, v, out, *probs)
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, grad, *_unused):
    qs, k, v, out, *probs = ctx.saved_tensors
    return _backward(grad, qs, k, v, out, probs)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


class _CausalAttentionCPU(torch.autograd.Function):
    """Eager calls: the same functions as the custom ops, without their dispatch."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, qs, k, v, out_grouped, probs = _attention(q, k, v)
        ctx.save_for_backward(qs, k, v, out_grouped, *probs)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qs, k, v, out, *probs = ctx.saved_tensors
        return _attention_backward(grad, qs, k, v, out, probs)


def causal_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v for (B, H, S, D) q and (B, Hkv, S, D) k, v (H a multiple of Hkv)."""
    if torch.compiler.is_compiling():
        return _forward(q, k, v)[0]
    return _CausalAttentionCPU.apply(q, k, v)
