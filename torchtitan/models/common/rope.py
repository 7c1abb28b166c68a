"""Rotary position embeddings, computed (never loaded) from the model args.

The table is a non-persistent buffer: torchtitan once saved `freqs_cis` in
checkpoints and every converted checkpoint broke; we recompute it in
`init_weights` after `to_empty`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RopeScaling:
    """Llama 3.1 frequency scaling (`use_scaled_rope`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return freqs
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    scaled = torch.where(wavelen > low_wavelen, freqs / scaling.factor, freqs)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, (1 - smooth) * freqs / scaling.factor + smooth * freqs, scaled)


def rope_cache(head_dim: int, max_seq_len: int, theta: float, scaling: RopeScaling | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
    """(max_seq_len, head_dim // 2, 2) table of cos and sin, in float32."""
    freqs = rope_frequencies(head_dim, theta, scaling).to(device)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device=device), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def _select(cache: torch.Tensor, seqlen: int, positions: torch.Tensor | None) -> torch.Tensor:
    if positions is None:
        return cache[:seqlen].unsqueeze(0)  # (1, S, D/2, 2)
    return cache[positions]  # (B, S, D/2, 2)


def apply_rope_interleaved(x: torch.Tensor, cache: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Meta's layout: rotate adjacent pairs (x0, x1), (x2, x3), ... of each head. x: (B, S, H, D)."""
    cs = _select(cache, x.shape[1], positions).unsqueeze(2)  # (B|1, S, 1, D/2, 2)
    cos, sin = cs[..., 0], cs[..., 1]
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def apply_rope_half(x: torch.Tensor, cache: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """GPT-NeoX / HF layout: rotate the first half of each head against the second. x: (B, S, H, D)."""
    cs = _select(cache, x.shape[1], positions).unsqueeze(2)
    cos, sin = cs[..., 0], cs[..., 1]
    xf = x.float()
    x0, x1 = xf.chunk(2, dim=-1)
    return torch.cat([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).type_as(x)
