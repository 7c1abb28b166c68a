"""Llama 3: model args (Meta's FFN-width rule) and the flavor table."""
from __future__ import annotations

from dataclasses import dataclass

from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.rope import RopeScaling


@dataclass
class LlamaModelArgs(DecoderArgs):
    """Pre-norm RMSNorm blocks, interleaved-pair RoPE, SwiGLU, Meta's parameter names."""

    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def architecture(self) -> dict:
        out = super().architecture()
        del out["multiple_of"], out["ffn_dim_multiplier"]  # they only decide ffn_hidden_dim
        return out


_LLAMA_3_1 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_LLAMA_3_2 = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

llama3_flavors: dict[str, LlamaModelArgs] = {
    # Small enough to learn visibly in about a minute on 2 CPU cores; vocab fits the bundled tokenizer.
    "debugmodel": LlamaModelArgs(dim=256, n_layers=6, n_heads=16, n_kv_heads=8, vocab_size=2048, rope_theta=500000),
    "1B": LlamaModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5, multiple_of=256,
                         rope_theta=500000, rope_scaling=_LLAMA_3_2, tie_word_embeddings=False),
    "3B": LlamaModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0, multiple_of=256,
                         rope_theta=500000, rope_scaling=_LLAMA_3_2),
    "8B": LlamaModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024,
                         rope_theta=500000, rope_scaling=_LLAMA_3_1),
    # The 8B layer shape with 8 layers: the single-GPU benchmark shape
    # (docs/debugging.md, "The torchtitan baseline").
    "8B_8L": LlamaModelArgs(dim=4096, n_layers=8, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024,
                            rope_theta=500000),
    "70B": LlamaModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096,
                          rope_theta=500000, rope_scaling=_LLAMA_3_1),
    "405B": LlamaModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2, multiple_of=4096,
                           rope_theta=500000, rope_scaling=_LLAMA_3_1),
}
