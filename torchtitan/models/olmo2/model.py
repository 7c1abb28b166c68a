"""OLMo 2: reordered norms (RMSNorm after attention and after the MLP, none before) and QK-norm.

The QK-norm normalizes the whole q projection (all heads at once) and the whole
k projection before they are split into heads and rotated, exactly as OLMo 2
and transformers' Olmo2 do; under tensor parallel that width is split across
ranks, which olmo2/parallelize.py handles without this module knowing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.olmo.model import FeedForward, OlmoTransformerBase, attend, trunc_normal


@dataclass
class Olmo2ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    ffn_hidden_dim: int = 11008
    # The embedding size: the dolma2 tokenizer's 100278 ids padded to a multiple of 128.
    vocab_size: int = 100352
    norm_eps: float = 1e-6
    rope_theta: float = 500000.0
    max_seq_len: int = 4096
    tie_word_embeddings: bool = False
    # OLMo 2 draws every weight from N(0, 0.02) truncated at 3 sigma.
    init_std: float = 0.02
    sdpa_backend: str = "default"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def layer_params(self) -> int:
        d, hd, kv, f = self.dim, self.head_dim, self.kv_heads, self.ffn_hidden_dim
        matmuls = 2 * d * self.n_heads * hd + 2 * d * kv * hd + 3 * d * f
        return matmuls + 2 * d + self.n_heads * hd + kv * hd  # post norms, q_norm, k_norm

    def num_params(self, exclude_embedding: bool = True) -> int:
        embed = self.vocab_size * self.dim
        total = self.n_layers * self.layer_params() + self.dim + embed * (1 if self.tie_word_embeddings else 2)
        return total - (embed if exclude_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        matmul = self.n_layers * self.layer_params() + self.dim + self.vocab_size * self.dim
        return 6 * matmul + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len


class Attention(nn.Module):
    def __init__(self, args: Olmo2ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        q_width, kv_width = args.n_heads * args.head_dim, args.kv_heads * args.head_dim
        self.wq = nn.Linear(args.dim, q_width, bias=False)
        self.wk = nn.Linear(args.dim, kv_width, bias=False)
        self.wv = nn.Linear(args.dim, kv_width, bias=False)
        self.wo = nn.Linear(q_width, args.dim, bias=False)
        self.q_norm = nn.RMSNorm(q_width, eps=args.norm_eps)
        self.k_norm = nn.RMSNorm(kv_width, eps=args.norm_eps)
        self.sdpa = ScaledDotProductAttention(args.sdpa_backend)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        q = self.q_norm(self.wq(x))
        k = self.k_norm(self.wk(x))
        return self.wo(attend(q, k, self.wv(x), self.sdpa, self.head_dim, rope, positions))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: Olmo2ModelArgs):
        super().__init__()
        self.init_std = args.init_std
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.post_attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.post_ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)

    def init_weights(self) -> None:
        a, f = self.attention, self.feed_forward
        for lin in (a.wq, a.wk, a.wv, a.wo, f.w1, f.w2, f.w3):
            trunc_normal(lin.weight, self.init_std)
        for norm in (a.q_norm, a.k_norm, self.post_attention_norm, self.post_ffn_norm):
            norm.reset_parameters()

    def forward(self, x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.post_attention_norm(self.attention(x, rope, positions))
        return h + self.post_ffn_norm(self.feed_forward(h))


class Transformer(OlmoTransformerBase):
    """OLMo 2 decoder."""

    def build_block(self, layer_id: int, args: Olmo2ModelArgs) -> nn.Module:
        return TransformerBlock(layer_id, args)

    def build_final_norm(self, args: Olmo2ModelArgs) -> nn.Module:
        return nn.RMSNorm(args.dim, eps=args.norm_eps)

    def init_embeddings(self) -> None:
        if self.tok_embeddings is not None:
            trunc_normal(self.tok_embeddings.weight, self.args.init_std)
        if self.output is not None and not self.args.tie_word_embeddings:
            trunc_normal(self.output.weight, self.args.init_std)
