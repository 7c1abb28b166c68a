"""gpt-oss: model args and the flavor table."""
from __future__ import annotations

from dataclasses import dataclass, field

from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.moe import MoEArgs
from torchtitan.models.common.rope import YarnScaling


def gpt_oss_moe(num_experts: int, hidden_dim: int = 2880, top_k: int = 4) -> MoEArgs:
    """gpt-oss's experts: softmax over the top-k router logits (= renormalized top-k), router and expert
    biases, the clamped SwiGLU (alpha 1.702, limit 7, up + 1)."""
    return MoEArgs(num_experts=num_experts, top_k=top_k, hidden_dim=hidden_dim, norm_topk_prob=True,
                   router_bias=True, expert_linear_bias=True, gate="clamped_swiglu")


# rope_scaling of openai/gpt-oss-{20b,120b}'s config.json: YaRN x32 from 4096 positions, ramp not truncated.
GPT_OSS_YARN = YarnScaling(factor=32.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                           truncate=False)


@dataclass
class GptOssModelArgs(DecoderArgs):
    """Pre-norm RMSNorm decoder, every feed-forward a mixture of experts; attention with biases on q, k, v, o and a
    learned sink logit per head, alternating sliding-window (128) and full layers, grouped KV heads of head_dim
    64, rotate-half RoPE with YaRN. Weights N(0, 0.02) truncated at 3 sigma, biases and sinks at zero."""

    dim: int = 2880
    ffn_hidden_dim: int = 2880  # no dense layer; the expert width is moe.hidden_dim
    n_heads: int = 64
    n_kv_heads: int | None = 8
    head_dim: int | None = 64
    vocab_size: int = 201088
    norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    rope_scaling: YarnScaling | None = field(default_factory=lambda: GPT_OSS_YARN)
    max_seq_len: int = 131072
    rope_layout: str = "half"
    init: str = "olmo2"
    attention_bias: bool = True
    attention_sinks: bool = True
    sliding_window: int | None = 128
    attention_pattern: tuple[str, ...] = ("sliding", "full")
    moe: MoEArgs | None = field(default_factory=lambda: gpt_oss_moe(32))


gpt_oss_flavors: dict[str, GptOssModelArgs] = {
    # Tiny, for CPU tests: 4 layers alternating a 16-token window and full attention, 4 heads of head_dim 32 (dim
    # 64 / 4 = 16 apart), 2 KV heads, 8 experts of width 128 top-2, YaRN x4 from 32 positions (test sequences
    # reach the scaled range); vocab fits the bundled 2048-id tokenizer.
    "debugmodel": GptOssModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, ffn_hidden_dim=128,
                                  vocab_size=2048, max_seq_len=4096, sliding_window=16,
                                  rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=32,
                                                           truncate=False),
                                  moe=gpt_oss_moe(8, hidden_dim=128, top_k=2)),
    # The debug model with one dense SwiGLU of the active width in place of the experts (the CPU benchmark's
    # comparator).
    "debugmodel-dense": GptOssModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, ffn_hidden_dim=256,
                                        vocab_size=2048, max_seq_len=4096, sliding_window=16,
                                        rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=32,
                                                                 truncate=False), moe=None),
    # openai/gpt-oss-20b and gpt-oss-120b (config.json).
    "20B": GptOssModelArgs(n_layers=24, moe=gpt_oss_moe(32)),
    "120B": GptOssModelArgs(n_layers=36, moe=gpt_oss_moe(128)),
}
