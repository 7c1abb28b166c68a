"""The attention core shared by all models, with a choosable SDPA backend.

The core is its own module so that parallelisms can replace it (context
parallel swaps in a version that gathers K/V across ranks) without the model
knowing. Backends: on Hopper the cuDNN kernel ran causal S=8192 D=128
forward+backward 1.75x faster than flash (shared/bench/README.md).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def resolve_sdpa_backend(name: str, device_type: str) -> str:
    """Turn the configured name into a concrete one for this device.

    auto: cuDNN on Hopper and newer (compute capability >= 9.0), flash on other
    CUDA GPUs, and torch's own choice ("default") elsewhere.
    """
    if name != "auto":
        if device_type != "cuda" and name in ("cudnn", "efficient"):
            raise ValueError(f"model.sdpa_backend = {name!r} needs a CUDA GPU; on {device_type} use auto, default, flash or math")
        return name
    if device_type == "cuda" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        return "cudnn" if major >= 9 else "flash"
    return "default"


class ScaledDotProductAttention(nn.Module):
    """Causal attention over (batch, heads, seq, head_dim) tensors."""

    def __init__(self, backend: str = "default"):
        super().__init__()
        self.backend = backend

    def _context(self):
        if self.backend == "default":
            return contextlib.nullcontext()
        return sdpa_kernel([SDPA_BACKENDS[self.backend]])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        # Positions only matter when the sequence is split across ranks; locally the
        # tokens are contiguous and in order, so the plain causal mask is exact.
        with self._context():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
