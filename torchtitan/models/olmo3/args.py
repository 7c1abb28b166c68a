"""OLMo 3: model args and the flavor table."""
from __future__ import annotations

from dataclasses import dataclass

from torchtitan.models.common.rope import YarnScaling
from torchtitan.models.olmo2.args import Olmo2ModelArgs


@dataclass
class Olmo3ModelArgs(Olmo2ModelArgs):
    """OLMo 2's block (norms after attention and after the MLP, QK-norm over the full projection width,
    rotate-half RoPE, OLMo 2's init) with sliding-window attention: three of every four layers see only the
    4096 most recent keys, every fourth layer sees all of them. A RoPE scaling applies to the full-attention
    layers only, as transformers' Olmo3 applies a config's rope_scaling."""

    # OLMo 3 pretrained at 8192 tokens with plain RoPE (these defaults); the released models extend that to
    # 65,536 with YaRN on the full-attention layers (the 7B and 32B flavors).
    max_seq_len: int = 8192
    sliding_window: int | None = 4096
    attention_pattern: tuple[str, ...] = ("sliding", "sliding", "sliding", "full")
    rope_scaling_layers: str = "full"


# The rope_scaling block of allenai/Olmo-3-1025-7B's and Olmo-3-1125-32B's config.json (attention_factor is
# transformers' default, 0.1 ln(8) + 1, written out).
_OLMO3_YARN = YarnScaling(factor=8.0, original_max_position_embeddings=8192, beta_fast=32.0, beta_slow=1.0,
                          attention_factor=1.2079441541679836)

# Sizes from allenai/Olmo-3-1025-7B and Olmo-3-1125-32B (config.json). vocab_size is the embedding size: the
# dolma2 tokenizer's 100278 ids padded to a multiple of 128, as OLMo-core trains them; the released HF
# folders store the unpadded 100278 rows, and an import keeps what the folder has.
olmo3_flavors: dict[str, Olmo3ModelArgs] = {
    # Tiny, with grouped KV heads like the 32B, and a window short enough that the test and debug sequences
    # (32 to 256 tokens) slide past it; vocab fits the bundled 2048-id tokenizer. YaRN as the released models
    # have it, from 64 original positions, so those sequences reach the scaled range and the full-attention
    # layers use another RoPE table than the sliding ones.
    "debugmodel": Olmo3ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden_dim=768, vocab_size=2048,
                                 sliding_window=64, rope_scaling=YarnScaling(factor=4.0,
                                                                             original_max_position_embeddings=64)),
    "7B": Olmo3ModelArgs(dim=4096, n_layers=32, n_heads=32, ffn_hidden_dim=11008, max_seq_len=65536,
                         rope_scaling=_OLMO3_YARN),
    "32B": Olmo3ModelArgs(dim=5120, n_layers=64, n_heads=40, n_kv_heads=8, ffn_hidden_dim=27648, max_seq_len=65536,
                          rope_scaling=_OLMO3_YARN),
}
