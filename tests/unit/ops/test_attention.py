"""The attention core's mask kinds against a plain softmax written out by hand."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchtitan.ops import attention
from torchtitan.ops.attention import CAUSAL, AttentionCore, AttentionMask
from torchtitan.tools.errors import ConfigError


def _reference(q, k, v, window: int | None):
    s = q.shape[2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = j <= i if window is None else (j <= i) & (i - j < window)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("window", [None, 1, 3, 16, 40])
def test_mask_kinds_match_hand_written_softmax(window):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 24, 8, dtype=torch.float64) for _ in range(3))
    mask = CAUSAL if window is None else AttentionMask("sliding_window", window)
    torch.testing.assert_close(AttentionCore(mask)(q, k, v), _reference(q, k, v, window))


def test_sliding_window_across_tiles_with_grouped_heads(monkeypatch):
    """Tiles smaller than the window and than the sequence; K/V with half the query heads."""
    monkeypatch.setattr(attention, "LOCAL_TILE", 7)
    torch.manual_seed(0)
    q = torch.randn(2, 4, 30, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 30, 8, dtype=torch.float64) for _ in range(2))
    mask = AttentionMask("sliding_window", 10)
    expected = _reference(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), 10)
    torch.testing.assert_close(AttentionCore(mask)(q, k, v), expected)


def test_bad_masks_are_config_errors():
    with pytest.raises(ConfigError, match="not one of"):
        AttentionMask("document")
    with pytest.raises(ConfigError, match="window"):
        AttentionMask("sliding_window")
    with pytest.raises(ConfigError, match="window"):
        AttentionMask("causal", 4)


def test_grouped_kv_heads_without_copies_equal_repeated_heads():
    """The causal path hands SDPA 2 K/V heads for 8 query heads (enable_gqa): the same output and gradients as
    the heads repeated up to the queries. The flash backend is named: float32 CPU calls this short would
    otherwise run from explicit scores (test_cpu_attention.py)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, 128, 32, requires_grad=True) for h in (8, 2, 2))
    out = AttentionCore(CAUSAL, backend="flash")(q, k, v)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    ref.square().sum().backward()
    assert torch.equal(out, ref)
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, want)
