"""OLMo 3: model args and the flavor table."""
from __future__ import annotations

from dataclasses import dataclass

from torchtitan.models.olmo2.args import Olmo2ModelArgs


@dataclass
class Olmo3ModelArgs(Olmo2ModelArgs):
    """OLMo 2's block (norms after attention and after the MLP, QK-norm over the full projection width,
    rotate-half RoPE, OLMo 2's init) with sliding-window attention: three of every four layers see only the
    4096 most recent keys, every fourth layer sees all of them."""

    # OLMo 3 pretrained at 8192 tokens with plain RoPE; the released 65,536-token models add YaRN on the
    # full-attention layers only, which this decoder does not express (docs/olmo.md).
    max_seq_len: int = 8192
    sliding_window: int | None = 4096
    attention_pattern: tuple[str, ...] = ("sliding", "sliding", "sliding", "full")


# Sizes from allenai/Olmo-3-1025-7B and Olmo-3-1125-32B (config.json). vocab_size is the embedding size: the
# dolma2 tokenizer's 100278 ids padded to a multiple of 128, as OLMo-core trains them; the released HF
# folders store the unpadded 100278 rows, and an import keeps what the folder has.
olmo3_flavors: dict[str, Olmo3ModelArgs] = {
    # Tiny, with grouped KV heads like the 32B, and a window short enough that the test and debug sequences
    # (32 to 256 tokens) slide past it; vocab fits the bundled 2048-id tokenizer.
    "debugmodel": Olmo3ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden_dim=768, vocab_size=2048,
                                 sliding_window=64),
    "7B": Olmo3ModelArgs(dim=4096, n_layers=32, n_heads=32, ffn_hidden_dim=11008),
    "32B": Olmo3ModelArgs(dim=5120, n_layers=64, n_heads=40, n_kv_heads=8, ffn_hidden_dim=27648),
}
