"""OLMo 1 / 1.7: pre-norm blocks with non-parametric LayerNorm, no biases, SwiGLU, rotate-half RoPE.

Parameter names follow our Llama model (tok_embeddings, layers.N.attention.wq, ...,
feed_forward.w1/w2/w3, output) so parallelism plans and tooling read the same
FQNs for every family. The pieces OLMo 2 shares (SwiGLU, the transformer shell
with its RoPE table, tying and init) live here and are reused by olmo2/model.py.
This module knows nothing about parallelism.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.common.rope import apply_rope_half, rope_cache


@dataclass
class OlmoModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    ffn_hidden_dim: int = 11008
    # The embedding size, i.e. OLMo's `embedding_size` (the tokenizer's 50280 padded to a multiple of 128).
    vocab_size: int = 50304
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # OLMo 1.7 clamps q, k and v to [-clip_qkv, clip_qkv] for stability.
    clip_qkv: float | None = None
    max_seq_len: int = 2048
    tie_word_embeddings: bool = False
    sdpa_backend: str = "default"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def layer_params(self) -> int:
        d, hd, kv, f = self.dim, self.head_dim, self.kv_heads, self.ffn_hidden_dim
        return 2 * d * self.n_heads * hd + 2 * d * kv * hd + 3 * d * f + self.norm_params_per_layer()

    def norm_params_per_layer(self) -> int:
        return 0  # non-parametric LayerNorm

    def final_norm_params(self) -> int:
        return 0

    def num_params(self, exclude_embedding: bool = True) -> int:
        embed = self.vocab_size * self.dim
        total = self.n_layers * self.layer_params() + self.final_norm_params() + embed * (1 if self.tie_word_embeddings else 2)
        return total - (embed if exclude_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """6N over the matmul weights (the output projection counts even when tied) plus attention,
        with the same accounting as the Llama model so MFU numbers compare."""
        matmul = self.n_layers * self.layer_params() + self.final_norm_params() + self.vocab_size * self.dim
        return 6 * matmul + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len


class NonParametricLayerNorm(nn.Module):
    """LayerNorm without weight or bias, computed in float32 as OLMo and transformers do."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (self.dim,), None, None, self.eps).type_as(x)

    def reset_parameters(self) -> None:
        pass

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sdpa: nn.Module, head_dim: int, rope: torch.Tensor,
           positions: torch.Tensor | None) -> torch.Tensor:
    """Heads, rotate-half RoPE, GQA expansion and the shared attention core, from (B, S, width) projections.

    Heads are reshaped with -1 so that under tensor parallel each rank sees only its local heads.
    """
    bs, seqlen, _ = q.shape
    q = apply_rope_half(q.view(bs, seqlen, -1, head_dim), rope, positions)
    k = apply_rope_half(k.view(bs, seqlen, -1, head_dim), rope, positions)
    v = v.view(bs, seqlen, -1, head_dim)
    rep = q.shape[2] // k.shape[2]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
    out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), positions)
    return out.transpose(1, 2).reshape(bs, seqlen, -1)


class Attention(nn.Module):
    def __init__(self, args: OlmoModelArgs):
        super().__init__()
        self.head_dim, self.clip_qkv = args.head_dim, args.clip_qkv
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.sdpa = ScaledDotProductAttention(args.sdpa_backend)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        return self.wo(attend(q, k, v, self.sdpa, self.head_dim, rope, positions))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is HF's gate_proj, w3 its up_proj."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def trunc_normal(w: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(w, mean=0.0, std=std, a=-3 * std, b=3 * std)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: OlmoModelArgs):
        super().__init__()
        self.layer_id, self.dim = layer_id, args.dim
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = NonParametricLayerNorm(args.dim, args.norm_eps)
        self.ffn_norm = NonParametricLayerNorm(args.dim, args.norm_eps)

    def init_weights(self) -> None:
        """OLMo's "mitchell" init: inputs 1/sqrt(fan_in), outputs also scaled by 1/sqrt(2 (layer + 1))."""
        a, f = self.attention, self.feed_forward
        for lin in (a.wq, a.wk, a.wv, f.w1, f.w3):
            trunc_normal(lin.weight, 1.0 / math.sqrt(lin.in_features))
        for lin in (a.wo, f.w2):
            trunc_normal(lin.weight, 1.0 / math.sqrt(2 * lin.in_features * (self.layer_id + 1)))

    def forward(self, x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, positions)
        return h + self.feed_forward(self.ffn_norm(h))


class OlmoTransformerBase(nn.Module):
    """Embedding, blocks keyed by global index, final norm and output, shared by OLMo 1 and 2.

    Pipeline stages set tok_embeddings / norm / output to None for the pieces they do not own,
    and the ModuleDict keyed by layer index keeps FQNs stable when layers are removed.
    """

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): self.build_block(i, args) for i in range(args.n_layers)})
        self.norm = self.build_final_norm(args)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self._tie()
        self.register_buffer("rope_cache", self._rope(device=None), persistent=False)

    def build_block(self, layer_id: int, args) -> nn.Module:
        raise NotImplementedError

    def build_final_norm(self, args) -> nn.Module:
        raise NotImplementedError

    def init_embeddings(self) -> None:
        raise NotImplementedError

    def _tie(self) -> None:
        # Module._apply (to_empty, .to) replaces parameters one module at a time and so unties a shared
        # weight; init_weights calls this again. Under FSDP2 the shared parameter survives as one.
        if self.args.tie_word_embeddings and self.tok_embeddings is not None and self.output is not None:
            if self.output.weight is not self.tok_embeddings.weight:
                self.output.weight = self.tok_embeddings.weight

    def _rope(self, device) -> torch.Tensor:
        a = self.args
        return rope_cache(a.head_dim, a.max_seq_len, a.rope_theta, None, device=device)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        """Deterministic init given the RNG state; also rebuilds the RoPE table and the tie after to_empty."""
        device = buffer_device if buffer_device is not None else self.rope_cache.device
        self.rope_cache = self._rope(device=device)
        self._tie()
        self.init_embeddings()
        for layer in self.layers.values():
            layer.init_weights()
        if self.norm is not None:
            self.norm.reset_parameters()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (B, S) ids, or (B, S, dim) activations on a later pipeline stage."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, self.rope_cache, positions)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h


class Transformer(OlmoTransformerBase):
    """OLMo 1 / 1.7 decoder."""

    def build_block(self, layer_id: int, args: OlmoModelArgs) -> nn.Module:
        return TransformerBlock(layer_id, args)

    def build_final_norm(self, args: OlmoModelArgs) -> nn.Module:
        return NonParametricLayerNorm(args.dim, args.norm_eps)

    def init_embeddings(self) -> None:
        std = 1.0 / math.sqrt(self.args.dim)
        if self.tok_embeddings is not None:
            trunc_normal(self.tok_embeddings.weight, std)
        if self.output is not None and not self.args.tie_word_embeddings:
            trunc_normal(self.output.weight, std)
