"""DeepSeek-V3: model args and the flavor table."""
from __future__ import annotations

from dataclasses import dataclass, field

from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.mla import MLAArgs
from torchtitan.models.common.moe import MoEArgs
from torchtitan.models.common.rope import YarnScaling


def deepseek_moe(num_experts: int, hidden_dim: int, top_k: int, n_shared: int, n_dense: int, route_scale: float,
                 n_group: int = 1, topk_group: int = 1) -> MoEArgs:
    """DeepSeek-V3's experts: sigmoid scores renormalized over the chosen ones and scaled by route_scale, the
    aux-loss-free expert bias (moved between steps by trainer/balance.py), node-limited group routing, n_shared
    shared experts (one SwiGLU n_shared x wide), the first n_dense layers dense."""
    return MoEArgs(num_experts=num_experts, top_k=top_k, hidden_dim=hidden_dim, score_func="sigmoid",
                   norm_topk_prob=True, expert_bias=True, shared_expert_hidden_dim=n_shared * hidden_dim,
                   n_dense_layers=n_dense, n_group=n_group, topk_group=topk_group, route_scale=route_scale)


@dataclass
class DeepseekV3ModelArgs(DecoderArgs):
    """Pre-norm RMSNorm decoder with multi-head latent attention (models/common/mla.py) and DeepSeek's MoE
    feed-forwards after the first dense layers. Weights N(0, 0.02) truncated at 3 sigma. Multi-token prediction
    (DeepSeek's MTP module) is not part of the model: transformers' DeepseekV3ForCausalLM has none to test against."""

    dim: int = 7168
    ffn_hidden_dim: int = 18432  # the dense layers' width
    n_heads: int = 128
    vocab_size: int = 129280
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 163840
    attention: str = "mla"
    mla: MLAArgs | None = field(default_factory=MLAArgs)
    rope_layout: str = "interleaved"
    init: str = "olmo2"
    moe: MoEArgs | None = field(default_factory=lambda: deepseek_moe(256, 2048, 8, 1, 3, 2.5, 8, 4))


# rope_scaling of deepseek-ai/DeepSeek-V3's config.json: YaRN x40 from 4096 positions, mscale 1 on both sides
# (cos/sin unscaled; the softmax scale gains mscale(40, 1)^2).
DEEPSEEK_V3_YARN = YarnScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                               mscale=1.0, mscale_all_dim=1.0)

deepseek_v3_flavors: dict[str, DeepseekV3ModelArgs] = {
    # Tiny, for CPU tests: 4 layers (the first dense), 4 heads of q/k head dim 48 (32 + a 16-wide RoPE part) and
    # value head dim 24, low-rank queries (64) and a 32-wide KV latent; 8 experts of width 128 in 4 groups (a token
    # picks 2 groups, then its top-2), one shared expert, routed weights x2.5; YaRN x4 from 32 positions with
    # mscale; vocab fits the bundled 2048-id tokenizer.
    "debugmodel": DeepseekV3ModelArgs(
        dim=128, n_layers=4, n_heads=4, ffn_hidden_dim=384, vocab_size=2048, max_seq_len=4096,
        mla=MLAArgs(q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=24),
        rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=32, mscale=1.0, mscale_all_dim=1.0),
        moe=deepseek_moe(8, 128, 2, 1, 1, 2.5, n_group=4, topk_group=2)),
    # The debug model with one dense SwiGLU of the active width (top-2 plus the shared expert) in place of the
    # experts (the CPU benchmark's comparator).
    "debugmodel-dense": DeepseekV3ModelArgs(
        dim=128, n_layers=4, n_heads=4, ffn_hidden_dim=384, vocab_size=2048, max_seq_len=4096,
        mla=MLAArgs(q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=24),
        rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=32, mscale=1.0, mscale_all_dim=1.0),
        moe=None),
    # moonshotai/Moonlight-16B-A3B's shape (DeepSeek-V3's architecture at 16B, 3B active): no query bottleneck,
    # 64 experts top-6 in one group, two shared experts, the first layer dense.
    "16B-A3B": DeepseekV3ModelArgs(
        dim=2048, n_layers=27, n_heads=16, ffn_hidden_dim=11264, vocab_size=163840, norm_eps=1e-5,
        rope_theta=50000.0, max_seq_len=8192, mla=MLAArgs(q_lora_rank=0),
        moe=deepseek_moe(64, 1408, 6, 2, 1, 2.446)),
    # deepseek-ai/DeepSeek-V3 (671B, 37B active; its multi-token-prediction layer left out).
    "671B": DeepseekV3ModelArgs(n_layers=61, mla=MLAArgs(q_lora_rank=1536), rope_scaling=DEEPSEEK_V3_YARN),
}
