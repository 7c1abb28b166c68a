"""The attention core's mask kinds against a plain softmax written out by hand."""
from __future__ import annotations

import pytest
import torch

from torchtitan.ops.attention import CAUSAL, AttentionCore, AttentionMask, attend
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


def test_sliding_window_by_global_positions_equals_local():
    """A context-parallel rank sees shuffled global positions; the mask must follow them, not the order."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64) for _ in range(3))
    mask = AttentionMask("sliding_window", 5)
    full = attend(q, k, v, mask)
    perm = torch.randperm(16)
    pos = perm.unsqueeze(0)
    out = attend(q[:, :, perm], k[:, :, perm], v[:, :, perm], mask, "default", pos, pos)
    torch.testing.assert_close(out, full[:, :, perm])


def test_bad_masks_are_config_errors():
    with pytest.raises(ConfigError, match="not one of"):
        AttentionMask("document")
    with pytest.raises(ConfigError, match="window"):
        AttentionMask("sliding_window")
    with pytest.raises(ConfigError, match="window"):
        AttentionMask("causal", 4)
