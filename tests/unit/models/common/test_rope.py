"""Rotary position embeddings (models/common/rope.py): YaRN's frequencies, attention factor and RoPE table equal
transformers'."""
from __future__ import annotations

import pytest
import torch

from torchtitan.models.common.rope import (
    YarnScaling,
    apply_rope_half,
    apply_rope_interleaved,
    rope_cache,
    rope_frequencies,
)

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


def _pairwise(x, cache, positions, layout):
    """The rotation written per pair (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), as the layouts define it."""
    cs = (cache[: x.shape[1]].unsqueeze(0) if positions is None else cache[positions]).unsqueeze(2)
    cos, sin = cs[..., 0], cs[..., 1]
    if layout == "interleaved":
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    x0, x1 = x.chunk(2, dim=-1)
    return torch.cat([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("with_positions", [False, True])
def test_rope_equals_the_pairwise_rotation_bitwise(layout, with_positions):
    """Whole-width multiplies by (cos, +-sin) tables (the fast form) give the pairwise formula's bits."""
    torch.manual_seed(0)
    cache = rope_cache(32, 128, 500000.0)
    x = torch.randn(2, 64, 4, 32)
    positions = torch.randint(0, 128, (2, 64)) if with_positions else None
    apply = apply_rope_interleaved if layout == "interleaved" else apply_rope_half
    assert torch.equal(apply(x, cache, positions), _pairwise(x, cache, positions, layout))
