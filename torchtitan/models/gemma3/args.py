"""Gemma 3 (text): model args and the flavor table."""
from __future__ import annotations

from dataclasses import dataclass

from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.rope import LinearScaling

SLIDING_5_TO_1 = ("sliding",) * 5 + ("full",)


@dataclass
class Gemma3ModelArgs(DecoderArgs):
    """Five sliding-window layers (RoPE theta 10,000) to one global layer (theta 1e6, linearly scaled by 8 at 4B and
    up), per-head QK-norm, norms before and after attention and the MLP (sandwich), GeGLU with tanh GELU,
    embeddings scaled by sqrt(dim) and tied to the output, Gemma's (1 + w) RMSNorm everywhere, softmax scale
    query_pre_attn_scalar ** -0.5. Weights N(0, 0.02) truncated at 3 sigma (transformers: N(0, 0.02)), norm
    weights at zero (that is, scale one)."""

    ffn_hidden_dim: int = 6912
    vocab_size: int = 262144
    head_dim: int | None = 256
    norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_local_theta: float | None = 10000.0
    rope_scaling_layers: str = "full"
    max_seq_len: int = 32768
    tie_word_embeddings: bool = True
    norm: str = "rms_plus_one"
    block: str = "sandwich"
    qk_norm: str | None = "head"
    rope_layout: str = "half"
    feed_forward: str = "geglu"
    init: str = "olmo2"
    query_pre_attn_scalar: int | None = 256
    scale_embeddings: bool = True
    sliding_window: int | None = 512
    attention_pattern: tuple[str, ...] = SLIDING_5_TO_1


_LINEAR_8 = LinearScaling(factor=8.0)
# Sizes from the released google/gemma-3-1b-pt config.json and the text_config of gemma-3-{4,12,27}b-pt (with
# Gemma3TextConfig's defaults for what those leave out).
gemma3_flavors: dict[str, Gemma3ModelArgs] = {
    # Tiny, for CPU tests: six layers (five sliding with a 32-token window, shorter than the test sequences, one
    # global with linear RoPE scaling), GQA, head_dim 48 apart from dim / heads (32) and a query_pre_attn_scalar
    # (64) apart from head_dim; vocab fits the bundled 2048-id tokenizer.
    "debugmodel": Gemma3ModelArgs(dim=128, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=48, ffn_hidden_dim=384,
                                  vocab_size=2048, max_seq_len=4096, sliding_window=32, query_pre_attn_scalar=64,
                                  rope_scaling=LinearScaling(factor=4.0)),
    "1B": Gemma3ModelArgs(dim=1152, n_layers=26, n_heads=4, n_kv_heads=1, ffn_hidden_dim=6912),
    "4B": Gemma3ModelArgs(dim=2560, n_layers=34, n_heads=8, n_kv_heads=4, ffn_hidden_dim=10240, vocab_size=262208,
                          sliding_window=1024, max_seq_len=131072, rope_scaling=_LINEAR_8),
    "12B": Gemma3ModelArgs(dim=3840, n_layers=48, n_heads=16, n_kv_heads=8, ffn_hidden_dim=15360,
                           vocab_size=262208, sliding_window=1024, max_seq_len=131072, rope_scaling=_LINEAR_8),
    "27B": Gemma3ModelArgs(dim=5376, n_layers=62, n_heads=32, n_kv_heads=16, head_dim=128, ffn_hidden_dim=21504,
                           vocab_size=262208, sliding_window=1024, max_seq_len=131072, rope_scaling=_LINEAR_8,
                           query_pre_attn_scalar=168),
}
