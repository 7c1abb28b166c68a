"""OLMo 1 / 1.7: model args and the flavor table."""
from __future__ import annotations

from dataclasses import dataclass

from torchtitan.models.common.args import DecoderArgs


@dataclass
class OlmoModelArgs(DecoderArgs):
    """Pre-norm blocks with non-parametric LayerNorm, no biases, SwiGLU, rotate-half RoPE, "mitchell" init."""

    ffn_hidden_dim: int = 11008
    # The embedding size, i.e. OLMo's `embedding_size` (the tokenizer's 50280 padded to a multiple of 128).
    vocab_size: int = 50304
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    norm: str = "layernorm"
    rope_layout: str = "half"
    init: str = "olmo"


# Sizes from allenai/OLMo configs/official (OLMo-1B, OLMo-7B, OLMo-1.7-7B). vocab_size is OLMo's
# embedding_size: the GPT-NeoX tokenizer's 50280 ids padded to 50304.
olmo_flavors: dict[str, OlmoModelArgs] = {
    # Tiny, tied like the 1B so tests exercise tying; vocab fits the bundled 2048-id tokenizer.
    "debugmodel": OlmoModelArgs(dim=256, n_layers=4, n_heads=8, ffn_hidden_dim=768, vocab_size=2048,
                                tie_word_embeddings=True),
    "1B": OlmoModelArgs(dim=2048, n_layers=16, n_heads=16, ffn_hidden_dim=8192, tie_word_embeddings=True),
    "7B": OlmoModelArgs(dim=4096, n_layers=32, n_heads=32, ffn_hidden_dim=11008),
    # OLMo 1.7 clamps q, k and v to [-8, 8] for stability.
    "1.7-7B": OlmoModelArgs(dim=4096, n_layers=32, n_heads=32, ffn_hidden_dim=11008, clip_qkv=8.0, max_seq_len=4096),
}
