"""OLMoE: model args and the flavor table."""
from __future__ import annotations

from dataclasses import dataclass, field

from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.moe import MoEArgs


@dataclass
class OlmoeModelArgs(DecoderArgs):
    """OLMo's pre-norm decoder with every feed-forward a mixture of experts: RMSNorm, QK-norm over the whole
    projection width, rotate-half RoPE, softmax top-k routing without renormalization, every weight
    N(0, 0.02) truncated at 3 sigma."""

    # The dense width is unused (every layer is MoE) but part of the config HF writes.
    ffn_hidden_dim: int = 1024
    vocab_size: int = 50304
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    qk_norm: str | None = "width"
    rope_layout: str = "half"
    init: str = "olmo2"
    moe: MoEArgs | None = field(default_factory=lambda: MoEArgs(num_experts=64, top_k=8, hidden_dim=1024))


olmoe_flavors: dict[str, OlmoeModelArgs] = {
    # Tiny, for CPU tests: 8 experts, top-2, vocab of the bundled 2048-id tokenizer.
    "debugmodel": OlmoeModelArgs(dim=128, n_layers=4, n_heads=4, ffn_hidden_dim=256, vocab_size=2048,
                                 moe=MoEArgs(num_experts=8, top_k=2, hidden_dim=256)),
    # The debug model with one dense SwiGLU of the active width (top_k x expert width) in place of the experts:
    # the same parameters per token, what scripts/benchmark.py moe compares against.
    "debugmodel-dense": OlmoeModelArgs(dim=128, n_layers=4, n_heads=4, ffn_hidden_dim=512, vocab_size=2048, moe=None),
    # allenai/OLMoE-1B-7B-0924: 1.3B active of 6.9B parameters.
    "1B-7B": OlmoeModelArgs(dim=2048, n_layers=16, n_heads=16, ffn_hidden_dim=1024,
                            moe=MoEArgs(num_experts=64, top_k=8, hidden_dim=1024)),
    # A large MoE in OLMoE's architecture, for planning layouts (dry runs): 232B parameters, 19B active per
    # token; 94 layers of 128 experts (width 1536, top-8), d 4096, 32 heads with 4 KV heads, the Qwen vocabulary
    # size. No released checkpoint has this shape.
    "232B-A19B": OlmoeModelArgs(dim=4096, n_layers=94, n_heads=32, n_kv_heads=4, ffn_hidden_dim=1536,
                                vocab_size=151936, moe=MoEArgs(num_experts=128, top_k=8, hidden_dim=1536)),
}
