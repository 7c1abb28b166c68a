"""Independent references the tests compare against: dense attention written out, HF shards read whole, random
transformers models saved as HF folders, and those folders imported the way our tools import them."""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None,
                    documents: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention over (B, H, S, D) with every mask spelled out: causal, an optional sliding window (key k
    visible to query q when q - k < window) and optional (B, S) document ids; grouped K/V heads repeated. sinks:
    (H,) logits appended to every row's scores and dropped after the softmax (gpt-oss's eager attention)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q.shape[2]
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = (j <= i) if window is None else (j <= i) & (i - j < window)
    allowed = allowed[None, None]
    if documents is not None:
        allowed = allowed & (documents[:, None, :, None] == documents[:, None, None, :])
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is None:
        return scores.softmax(-1) @ v
    column = sinks.view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    return torch.cat([scores, column], dim=-1).softmax(-1)[..., :-1] @ v


def hf_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder's safetensors shards, by name."""
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def save_random_hf(model_cls, cfg, folder, seed: int, norm_mean: float = 1.0):
    """A transformers model of `cfg` with random weights (norm weights random around `norm_mean` too, so they
    matter: one for x * w norms, zero for Gemma's x * (1 + w)), in eval mode, saved to folder."""
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(norm_mean, 0.1)
    model.save_pretrained(str(folder))
    return model


def import_hf(folder):
    """(ModelInfo, our model with the folder's weights) as checkpoint.initial_load_path, the converters and
    generate.py see them."""
    from torchtitan.checkpoint import ModelWrapper
    from torchtitan.checkpoint.formats.hf import load_hf_into_model, model_from_hf_config, read_hf_config

    info = model_from_hf_config(read_hf_config(str(folder)), str(folder))
    model = info.spec.build_model(info.args)
    model.init_weights(buffer_device="cpu")
    load_hf_into_model(ModelWrapper([model]), info.spec.adapter(info.args), str(folder))
    return info, model.eval()
