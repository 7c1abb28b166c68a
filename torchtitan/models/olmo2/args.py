"""OLMo 2: model args and the flavor table."""
from __future__ import annotations

from dataclasses import dataclass

from torchtitan.models.common.args import DecoderArgs


@dataclass
class Olmo2ModelArgs(DecoderArgs):
    """RMSNorm after attention and after the MLP (none before), QK-norm over the full projection width,
    rotate-half RoPE, every weight N(0, 0.02) truncated at 3 sigma."""

    ffn_hidden_dim: int = 11008
    # The embedding size: the dolma2 tokenizer's 100278 ids padded to a multiple of 128.
    vocab_size: int = 100352
    norm_eps: float = 1e-6
    rope_theta: float = 500000.0
    max_seq_len: int = 4096
    block: str = "reordered_norm"
    qk_norm: str | None = "width"
    rope_layout: str = "half"
    init: str = "olmo2"


# Sizes from the released OLMo 2 configs (1B 0425, 7B/13B 1124, 32B 0325). vocab_size is the
# embedding size: the dolma2 tokenizer's 100278 ids padded to 100352.
olmo2_flavors: dict[str, Olmo2ModelArgs] = {
    # Tiny, with grouped KV heads like the 32B so tests cover GQA under the QK-norm; vocab fits the
    # bundled 2048-id tokenizer.
    "debugmodel": Olmo2ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden_dim=768, vocab_size=2048),
    "1B": Olmo2ModelArgs(dim=2048, n_layers=16, n_heads=16, ffn_hidden_dim=8192),
    "7B": Olmo2ModelArgs(dim=4096, n_layers=32, n_heads=32, ffn_hidden_dim=11008),
    "13B": Olmo2ModelArgs(dim=5120, n_layers=40, n_heads=40, ffn_hidden_dim=13824),
    "32B": Olmo2ModelArgs(dim=5120, n_layers=64, n_heads=40, n_kv_heads=8, ffn_hidden_dim=27648),
}
