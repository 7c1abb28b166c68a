"""Blockwise attention (pairs of spans merged by log-sum-exp) against a softmax written out by hand."""
from __future__ import annotations

import pytest
import torch

from tests.reference import dense_attention
from torchtitan.ops.attention import CAUSAL, AttentionMask
from torchtitan.ops.blockwise import (
    CAUSAL_PAIR,
    FULL,
    MASKED,
    SKIP,
    BlockPlan,
    Kernel,
    Span,
    blockwise_attention,
    pair_kind,
    tiles,
)


def documents_of(lengths: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in lengths])


def test_pair_kinds_follow_positions():
    a, b, c = Span(0, 8, 0), Span(8, 8, 0), Span(16, 8, 0)
    assert pair_kind(CAUSAL, b, a, False) == FULL
    assert pair_kind(CAUSAL, b, b, False) == CAUSAL_PAIR
    assert pair_kind(CAUSAL, a, b, False) == SKIP
    win = AttentionMask("sliding_window", 4)
    assert pair_kind(win, c, a, False) == SKIP  # every key at least 9 tokens back
    assert pair_kind(win, b, a, False) == MASKED  # the window's edge crosses the pair
    assert pair_kind(AttentionMask("sliding_window", 100), b, b, False) == CAUSAL_PAIR
    assert pair_kind(CAUSAL, b, a, True) == MASKED  # documents: data decides


@pytest.mark.parametrize("kernel", ["cpu", "math"])
@pytest.mark.parametrize("window,tile,docs,sinks", [
    (None, 8, False, False), (None, 40, False, False), (5, 8, False, False), (13, 8, False, False),
    (None, 8, True, False), (6, 16, True, False), (40, 7, True, False),
    (None, 8, False, True), (5, 8, False, True), (6, 16, True, True)])
def test_local_blockwise_matches_dense(kernel, window, tile, docs, sinks):
    """Forward and backward; with attention sinks (a per-head logit in every denominator) their gradient too."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 40, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 40, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    sink = torch.randn(4, dtype=torch.float64, requires_grad=True) * 2 if sinks else None
    documents = documents_of([[5, 20, 15], [40]]) if docs else None
    mask = CAUSAL if window is None else AttentionMask("sliding_window", window)
    spans = tiles(40, tile)
    plan = BlockPlan(mask, spans, (spans,), None, Kernel(kernel))
    out = blockwise_attention(q, k, v, plan, documents, sink)
    ref = dense_attention(q, k, v, window, documents, sink)
    torch.testing.assert_close(out, ref)
    if sinks:  # the sinks are in play: without them the output differs
        assert (out - dense_attention(q, k, v, window, documents)).abs().max() > 1e-2
    g = torch.randn_like(ref)
    inputs = (q, k, v, sink) if sinks else (q, k, v)
    grads = torch.autograd.grad((out * g).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * g).sum(), inputs)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_bfloat16_close_to_float32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    spans = tiles(64, 16)
    plan = BlockPlan(AttentionMask("sliding_window", 24), spans, (spans,))
    out = blockwise_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), plan)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dense_attention(q, k, v, 24), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 300])
def test_cuda_flash_kernel_matches_math(window):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    mask = CAUSAL if window is None else AttentionMask("sliding_window", window)
    spans = tiles(1024, 256)
    outs, grads = [], []
    for kernel in ("flash", "math"):
        out = blockwise_attention(q, k, v, BlockPlan(mask, spans, (spans,), None, Kernel(kernel)))
        outs.append(out.float())
        grads.append(torch.autograd.grad(out.float().square().sum(), (q, k, v)))
    torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=2e-2)
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)
