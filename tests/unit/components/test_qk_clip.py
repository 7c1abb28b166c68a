"""QK-clip (components/qk_clip.py) and the logit statistic it reads (ops/attention.py attention_with_logit_max)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.reference import dense_attention
from torchtitan.components.qk_clip import QKClip
from torchtitan.models import get_train_spec
from torchtitan.ops.attention import attention_with_logit_max
from torchtitan.ops.masks import CAUSAL, AttentionMask


@pytest.mark.parametrize("window,docs,sinks", [(None, False, False), (5, False, False), (None, True, False),
                                               (None, False, True)])
def test_output_is_attention_and_the_maximum_is_over_allowed_pairs(window, docs, sinks):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 12, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 12, 8, dtype=torch.float64), torch.randn(2, 2, 12, 8, dtype=torch.float64)
    documents = torch.tensor([[0] * 5 + [1] * 7, [0] * 12]) if docs else None
    sink = torch.randn(4, dtype=torch.float64) if sinks else None
    mask = CAUSAL if window is None else AttentionMask("sliding_window", window)
    out, logit_max = attention_with_logit_max(q, k, v, mask, documents, sink)
    torch.testing.assert_close(out, dense_attention(q, k, v, window, documents, sink))
    scores = q @ k.repeat_interleave(2, dim=1).mT / 8 ** 0.5
    i = torch.arange(12)
    ok = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] < window) if window else True)
    ok = ok[None, None] & ((documents[:, None, :, None] == documents[:, None, None, :]) if docs else True)
    expected = scores.masked_fill(~ok, float("-inf")).amax(dim=(0, 2, 3))
    torch.testing.assert_close(logit_max, expected)


def _model(kv_heads: int):
    spec = get_train_spec("llama3")
    args = dataclasses.replace(spec.model_args("debugmodel"), n_kv_heads=kv_heads)
    model = spec.build_meta_model(args)
    model.to_empty(device="cpu")
    model.init_weights(buffer_device="cpu", seed=0)
    with torch.no_grad():  # larger q/k weights: logits of a few units, some heads far above others
        for layer in model.layers.values():
            layer.attention.wq.weight.mul_(torch.linspace(1, 12, 16).repeat_interleave(16)[:, None])
    return model.train()


@pytest.mark.parametrize("kv_heads", [16, 8])  # as many K/V heads as query heads (q and k scaled), grouped (q only)
def test_clipped_heads_reach_the_threshold_and_the_others_stay(kv_heads):
    """Layer 0 sees the same input again (the embeddings): there, a clipped head's largest logit is the
    threshold exactly and every other head's is unchanged."""
    torch.manual_seed(0)
    model = _model(kv_heads)
    tokens = torch.randint(0, 2048, (2, 32))
    clip = QKClip(1.0, [model])
    attn = model.layers["0"].attention
    model(tokens)
    before = attn.logit_max.clone()
    largest = max(float(layer.attention.logit_max.max()) for layer in model.layers.values())
    threshold = float(before.median())
    clip.threshold = threshold
    clip.apply(None)
    assert float(clip.max_logit) == largest  # the logged statistic: the step's largest over layers and heads
    assert attn.logit_max is None  # reset for the next step
    assert int(clip.heads_clipped) >= int((before > threshold).sum()) > 0
    model(tokens)
    after = attn.logit_max
    over = before > threshold
    torch.testing.assert_close(after[over], torch.full_like(after[over], threshold), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after[~over], before[~over], rtol=1e-6, atol=1e-6)


def test_a_skipped_step_clips_nothing():
    model = _model(8)
    tokens = torch.randint(0, 2048, (2, 32))
    clip = QKClip(1e-3, [model])
    model(tokens)
    weights = model.layers["0"].attention.wq.weight.detach().clone()
    clip.apply(torch.ones((), dtype=torch.bool))
    assert torch.equal(model.layers["0"].attention.wq.weight, weights)
    assert int(clip.heads_clipped) == 0
