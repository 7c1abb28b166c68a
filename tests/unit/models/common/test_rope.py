"""Rotary position embeddings (models/common/rope.py): YaRN's frequencies, attention factor and RoPE table equal
transformers'."""
from __future__ import annotations

import pytest
import torch

from torchtitan.models.common.rope import YarnScaling, rope_cache, rope_frequencies

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("params", [
    dict(factor=8.0, original_max_position_embeddings=8192, attention_factor=1.2079441541679836),  # OLMo 3
    dict(factor=4.0, original_max_position_embeddings=16),
    dict(factor=32.0, original_max_position_embeddings=4096, beta_fast=16.0, beta_slow=2.0, mscale=1.0,
         mscale_all_dim=0.5),
    dict(factor=32.0, original_max_position_embeddings=4096, truncate=False),  # gpt-oss's untruncated ramp
    dict(factor=1.0, original_max_position_embeddings=64),  # no attention factor; a factor-1 ramp changes nothing
])
@pytest.mark.parametrize("head_dim,theta", [(128, 500000.0), (16, 1000.0), (64, 150000.0)])
def test_yarn_frequencies_and_attention_factor_equal_transformers(params, head_dim, theta):
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    # A flat rope_parameters (Llama's) is where transformers 5.24 reads `truncate`; Olmo3's keyed one ignores it.
    config = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=65536,
                                      rope_parameters={"rope_type": "yarn", "rope_theta": theta, **params})
    want_freqs, want_factor = _compute_yarn_parameters(config)
    scaling = YarnScaling(**params)
    freqs = rope_frequencies(head_dim, theta, scaling)
    assert freqs.dtype == torch.float64
    torch.testing.assert_close(freqs.float(), want_freqs, rtol=2e-6, atol=0)  # theirs is computed in float32
    assert scaling.attention_scale == want_factor
    table = rope_cache(head_dim, 64, theta, scaling)
    angles = torch.outer(torch.arange(64, dtype=torch.float64), freqs)
    want = torch.stack([angles.cos(), angles.sin()], dim=-1) * want_factor
    assert table.dtype == torch.float32 and torch.equal(table, want.float())
