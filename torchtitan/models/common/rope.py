"""Rotary position embeddings, computed (never loaded) from the model args.

The table is a non-persistent buffer: torchtitan once saved `freqs_cis` in
checkpoints and every converted checkpoint broke; we recompute it in
`init_weights` after `to_empty`.

Three frequency scalings: Llama 3.1's (`RopeScaling`), YaRN (`YarnScaling`, the
released 65K-context OLMo 3 models) and linear interpolation (`LinearScaling`, Gemma 3).
Each names itself in a `kind` field, so the args dict of a checkpoint marker says which
one to rebuild (checkpoint/io.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class RopeScaling:
    """Llama 3.1 frequency scaling (`use_scaled_rope`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    kind: str = field(default="llama3", init=False)


@dataclass
class LinearScaling:
    """Position interpolation: every frequency divided by `factor` (transformers' "linear"; Gemma 3's full-attention
    layers at 4B and up)."""

    factor: float = 8.0
    kind: str = field(default="linear", init=False)


@dataclass
class YarnScaling:
    """YaRN (Peng et al. 2023, arXiv:2309.00071) as transformers computes it (`_compute_yarn_parameters`,
    checked on 5.24): frequencies ramp from interpolated (divided by `factor`) to unchanged between the
    dimensions that turn `beta_slow` and `beta_fast` times over `original_max_position_embeddings`, and cos and
    sin are multiplied by an attention factor (None: 0.1 ln(factor) + 1, or the mscale/mscale_all_dim ratio
    when both are set, as in transformers)."""

    factor: float = 8.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True  # round the ramp's ends outwards to whole dimensions (gpt-oss sets False)
    kind: str = field(default="yarn", init=False)

    @property
    def attention_scale(self) -> float:
        """What cos and sin are multiplied by."""
        if self.attention_factor is not None:
            return self.attention_factor

        def get_mscale(scale: float, mscale: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return get_mscale(self.factor, self.mscale) / get_mscale(self.factor, self.mscale_all_dim)
        return get_mscale(self.factor)


AnyRopeScaling = RopeScaling | YarnScaling | LinearScaling


def _yarn_frequencies(freqs: torch.Tensor, head_dim: int, theta: float, s: YarnScaling) -> torch.Tensor:
    def correction_dim(rotations: float) -> float:
        """The dimension whose frequency turns `rotations` times over the original context."""
        wavelength = s.original_max_position_embeddings / rotations
        return head_dim * math.log(wavelength / (2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the frequency is unchanged (extrapolation), 0: divided by factor (interpolation)
    return freqs / s.factor * (1 - keep) + freqs * keep


def rope_frequencies(head_dim: int, theta: float, scaling: AnyRopeScaling | None = None) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return freqs
    if isinstance(scaling, YarnScaling):
        return _yarn_frequencies(freqs, head_dim, theta, scaling)
    if isinstance(scaling, LinearScaling):
        return freqs / scaling.factor
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    scaled = torch.where(wavelen > low_wavelen, freqs / scaling.factor, freqs)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, (1 - smooth) * freqs / scaling.factor + smooth * freqs, scaled)


def rope_cache(head_dim: int, max_seq_len: int, theta: float, scaling: AnyRopeScaling | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
    """(max_seq_len, head_dim // 2, 2) table of cos and sin, in float32 (YaRN's attention factor included)."""
    freqs = rope_frequencies(head_dim, theta, scaling).to(device)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device=device), freqs)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)
    if isinstance(scaling, YarnScaling):
        table = table * scaling.attention_scale
    return table.float()


def _select(cache: torch.Tensor, seqlen: int, positions: torch.Tensor | None) -> torch.Tensor:
    if positions is None:
        return cache[:seqlen].unsqueeze(0)  # (1, S, D/2, 2)
    return cache[positions]  # (B, S, D/2, 2)


def apply_rope_interleaved(x: torch.Tensor, cache: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Meta's layout: rotate adjacent pairs (x0, x1), (x2, x3), ... of each head. x: (B, S, H, D).

    Written as two whole-width multiplies by (cos, +-sin) tables, not per pair: the same bits as the pairwise
    formula (a - b is a + (-b) exactly), without the strided half-width views that made it several times slower
    forward and backward."""
    cs = _select(cache, x.shape[1], positions).unsqueeze(2)  # (B|1, S, 1, D/2, 2)
    cos = cs[..., 0].repeat_interleave(2, dim=-1)  # (c0, c0, c1, c1, ...)
    sin = torch.stack([-cs[..., 1], cs[..., 1]], dim=-1).flatten(-2)  # (-s0, s0, -s1, s1, ...)
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return (xf * cos + swapped * sin).type_as(x)


def apply_rope_half(x: torch.Tensor, cache: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """GPT-NeoX / HF layout: rotate the first half of each head against the second. x: (B, S, H, D).
    Whole-width multiplies, as apply_rope_interleaved."""
    cs = _select(cache, x.shape[1], positions).unsqueeze(2)
    cos = torch.cat([cs[..., 0], cs[..., 0]], dim=-1)
    sin = torch.cat([-cs[..., 1], cs[..., 1]], dim=-1)
    xf = x.float()
    swapped = xf.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (second half, first half)
    return (xf * cos + swapped * sin).type_as(x)
