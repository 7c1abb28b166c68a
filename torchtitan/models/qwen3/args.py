"""Qwen3 (dense): model args and the flavor table."""
from __future__ import annotations

from dataclasses import dataclass

from torchtitan.models.common.args import DecoderArgs


@dataclass
class Qwen3ModelArgs(DecoderArgs):
    """Pre-norm RMSNorm decoder with grouped-query attention, an explicit head_dim (128, apart from
    dim / n_heads), per-head QK RMSNorm before RoPE, rotate-half RoPE (theta 1e6) and SwiGLU; the small sizes
    tie the output to the embedding. Every weight N(0, 0.02) truncated at 3 sigma (transformers draws
    N(0, initializer_range = 0.02) untruncated)."""

    ffn_hidden_dim: int = 12288
    vocab_size: int = 151936
    head_dim: int | None = 128
    norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_seq_len: int = 40960
    qk_norm: str | None = "head"
    rope_layout: str = "half"
    init: str = "olmo2"


# Sizes from the released Qwen/Qwen3-* config.json files (vocab_size 151936, max_position_embeddings 40960).
qwen3_flavors: dict[str, Qwen3ModelArgs] = {
    # Tiny, for CPU tests: head_dim 32 apart from dim / heads (128 / 8 = 16), grouped KV heads; untied like the
    # 8B and up, so pipeline parallel can split it (tying is tested on the HF round trips); vocab fits the
    # bundled 2048-id tokenizer.
    "debugmodel": Qwen3ModelArgs(dim=128, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, ffn_hidden_dim=384,
                                 vocab_size=2048, max_seq_len=4096),
    "0.6B": Qwen3ModelArgs(dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, ffn_hidden_dim=3072,
                           tie_word_embeddings=True),
    "1.7B": Qwen3ModelArgs(dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, ffn_hidden_dim=6144,
                           tie_word_embeddings=True),
    "4B": Qwen3ModelArgs(dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, ffn_hidden_dim=9728,
                         tie_word_embeddings=True),
    "8B": Qwen3ModelArgs(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, ffn_hidden_dim=12288),
    "14B": Qwen3ModelArgs(dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, ffn_hidden_dim=17408),
    "32B": Qwen3ModelArgs(dim=5120, n_layers=64, n_heads=64, n_kv_heads=8, ffn_hidden_dim=25600),
}
