"""Independent references the tests compare against: dense attention written out, HF shards read whole."""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None,
                    documents: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention over (B, H, S, D) with every mask spelled out: causal, an optional sliding window (key k
    visible to query q when q - k < window) and optional (B, S) document ids; grouped K/V heads repeated."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q.shape[2]
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = (j <= i) if window is None else (j <= i) & (i - j < window)
    allowed = allowed[None, None]
    if documents is not None:
        allowed = allowed & (documents[:, None, :, None] == documents[:, None, None, :])
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def hf_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder's safetensors shards, by name."""
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out
