"""The attention core: which keys each query may see (the mask kind) and the SDPA kernel that computes it.

It is a module of its own so that parallelisms can replace it (context parallel
swaps in a subclass that passes K/V around the ranks) without the model knowing.
Masks are defined by token positions, so one definition serves a local sequence
and a context-parallel rank's chunks (their global positions).
Backends: on Hopper the cuDNN kernel ran causal S=8192 D=128 forward+backward
1.75x faster than flash (docs/debugging.md, "The torchtitan baseline").
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from torchtitan.ops.blockwise import BlockPlan, blockwise_attention, tiles
from torchtitan.ops.cpu_attention import causal_attention_cpu, explicit_causal_eligible
from torchtitan.ops.masks import CAUSAL, AttentionMask
from torchtitan.tools.errors import ConfigError

__all__ = ["CAUSAL", "AttentionCore", "AttentionMask", "resolve_sdpa_backend", "sdpa_context"]

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
            raise ConfigError(f"model.sdpa_backend = {name!r} needs a CUDA GPU; on {device_type} use auto, default, "
                              f"flash or math")
        return name
    if device_type == "cuda" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        return "cudnn" if major >= 9 else "flash"
    return "default"


def sdpa_context(backend: str):
    return contextlib.nullcontext() if backend == "default" else sdpa_kernel([SDPA_BACKENDS[backend]])


def native_gqa(device_type: str, backend: str) -> bool:
    """Whether SDPA takes grouped K/V heads as they are (enable_gqa) rather than copies repeated up to the query
    heads. CPU kernels do (no copy); on CUDA only the flash kernel does,
    and a GQA call the chosen kernel cannot take would fall back to the math kernel."""
    return device_type != "cuda" or backend == "flash"


LOCAL_TILE = 1024  # tokens per block when a local sequence is attended blockwise (sliding window, documents)


class AttentionCore(nn.Module):
    """The swappable core: (B, H, S, D) queries, (B, Hkv, S, D) keys/values -> (B, H, S, D).

    Plain causal attention runs SDPA with is_causal (no mask tensor: the flash and cuDNN kernels stay
    eligible), except short float32 sequences on CPU under the default backend, which run from explicit
    scores (ops/cpu_attention.py: faster there than torch's CPU flash kernel). A sliding window, document
    masking or attention sinks run blockwise (ops/blockwise.py): tiles outside the window are skipped and no
    (S x S) mask is built. documents: (B, S) document ids of the whole
    sequence.
    """

    traceable = True  # torch.compile may trace it (context parallel's ring may not)

    def __init__(self, mask: AttentionMask = CAUSAL, backend: str = "default"):
        super().__init__()
        self.mask, self.backend = mask, backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                documents: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """sinks: (H,) learned per-head logits in the softmax denominators (attention sinks), or None."""
        if self.mask.kind == "causal" and documents is None and sinks is None:
            if self.backend == "default" and explicit_causal_eligible(q, k):
                return causal_attention_cpu(q, k, v)
            rep = q.shape[1] // k.shape[1]
            if rep == 1:
                with sdpa_context(self.backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if native_gqa(q.device.type, self.backend):
                with sdpa_context(self.backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            with sdpa_context(self.backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        spans = tiles(q.shape[2], LOCAL_TILE)
        return blockwise_attention(q, k, v, BlockPlan(self.mask, spans, (spans,)), documents, sinks)

    def extra_repr(self) -> str:
        window = f", window={self.mask.window}" if self.mask.window else ""
        return f"mask={self.mask.kind}{window}, backend={self.backend}"


def attention_with_logit_max(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
                             documents: torch.Tensor | None = None,
                             sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention from its explicit scores, and each head's largest score over the batch and the pairs the mask
    allows: QK-clip's statistic (components/qk_clip.py), read off the scores the output is computed from. The
    (S x S) scores of every head exist at once: the price of a statistic no fused SDPA kernel returns."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * q.shape[-1] ** -0.5
    pos = torch.arange(q.shape[2], device=q.device).unsqueeze(0)
    ok = mask.allowed(pos, pos)
    if documents is not None:
        ok = ok & (documents[:, None, :, None] == documents[:, None, None, :])
    scores = scores.masked_fill(~ok, float("-inf"))
    logit_max = scores.detach().amax(dim=(0, 2, 3))
    if sinks is not None:  # one more logit per head in every denominator, of value zero
        sink = sinks.to(acc).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs @ v.to(acc)).to(q.dtype), logit_max
