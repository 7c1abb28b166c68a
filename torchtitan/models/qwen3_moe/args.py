"""Qwen3-MoE: model args and the flavor table."""
from __future__ import annotations

from dataclasses import dataclass, field

from torchtitan.models.common.moe import MoEArgs
from torchtitan.models.qwen3.args import Qwen3ModelArgs


@dataclass
class Qwen3MoeModelArgs(Qwen3ModelArgs):
    """Qwen3's attention and block with mixture-of-experts feed-forwards: softmax top-8 of 128 experts,
    renormalized over the chosen ones (norm_topk_prob), no shared expert. Layers outside the MoE selection
    (moe.sparse_step, moe.dense_layer_ids: transformers' decoder_sparse_step, mlp_only_layers) keep a dense
    SwiGLU of ffn_hidden_dim."""

    ffn_hidden_dim: int = 6144
    moe: MoEArgs | None = field(default_factory=lambda: MoEArgs(num_experts=128, top_k=8, hidden_dim=768,
                                                                norm_topk_prob=True))


# Sizes from the released Qwen/Qwen3-30B-A3B and Qwen3-235B-A22B config.json files.
qwen3_moe_flavors: dict[str, Qwen3MoeModelArgs] = {
    # Tiny, for CPU tests: 8 experts of width 128, top-2 renormalized, head_dim apart from dim / heads, GQA,
    # one dense layer (dense_layer_ids) so both feed-forward kinds are in play; the bundled tokenizer's vocab.
    "debugmodel": Qwen3MoeModelArgs(dim=128, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, ffn_hidden_dim=256,
                                    vocab_size=2048, max_seq_len=4096,
                                    moe=MoEArgs(num_experts=8, top_k=2, hidden_dim=128, norm_topk_prob=True,
                                                dense_layer_ids=(1,))),
    # The debug model with one dense SwiGLU of the active width (top_k x expert width) in place of the
    # experts: the same parameters per token, what the CPU benchmark compares against.
    "debugmodel-dense": Qwen3MoeModelArgs(dim=128, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32,
                                          ffn_hidden_dim=256, vocab_size=2048, max_seq_len=4096, moe=None),
    "30B-A3B": Qwen3MoeModelArgs(dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, ffn_hidden_dim=6144,
                                 moe=MoEArgs(num_experts=128, top_k=8, hidden_dim=768, norm_topk_prob=True)),
    "235B-A22B": Qwen3MoeModelArgs(dim=4096, n_layers=94, n_heads=64, n_kv_heads=4, ffn_hidden_dim=12288,
                                   moe=MoEArgs(num_experts=128, top_k=8, hidden_dim=1536, norm_topk_prob=True)),
}
