"""Mixture-of-experts helpers shared by tests: a tiny float64 MoE layer (tests/unit/models/common/test_moe.py,
tests/unit/trainer/test_balance.py), and OLMoE flavors' shapes with the parameter counts they imply, by hand
(tests/integration/test_dry_run.py, tests/unit/trainer/test_dry_run.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from torchtitan.models.common.moe import MoE, MoEArgs

DIM, E, K, HIDDEN = 12, 6, 2, 10


def tiny_moe(score_func: str = "softmax", norm_topk_prob: bool = False, expert_bias: bool = False) -> MoE:
    """A float64 MoE layer of E experts (top-K, width HIDDEN) on DIM features, weights drawn with std 0.4."""
    torch.manual_seed(0)
    moe = MoE(DIM, MoEArgs(num_experts=E, top_k=K, hidden_dim=HIDDEN, score_func=score_func,
                           norm_topk_prob=norm_topk_prob, expert_bias=expert_bias)).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.4)
    return moe


@dataclass(frozen=True)
class Moe:
    """An OLMoE flavor's shapes (torchtitan/models/olmoe/args.py), and the parameter counts they imply."""

    dim: int
    layers: int
    heads: int
    kv_heads: int
    experts: int
    width: int  # each expert's SwiGLU hidden size
    vocab: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.dim // self.heads

    @property
    def expert(self) -> int:
        """One expert of one layer: w1 and w3 (width x dim) and w2 (dim x width)."""
        return 3 * self.width * self.dim

    @property
    def dense_layer(self) -> int:
        """One block without its experts: wq, wo (dim x dim), wk, wv (kv_dim x dim), the router (experts x
        dim), q_norm (dim), k_norm (kv_dim; QK-norm over the whole projection), attention_norm and ffn_norm."""
        return 2 * self.dim * self.dim + 2 * self.kv_dim * self.dim + self.experts * self.dim \
            + self.dim + self.kv_dim + 2 * self.dim

    @property
    def embedding(self) -> int:
        return self.vocab * self.dim  # tok_embeddings; the output (untied) is the same size

    @property
    def total(self) -> int:
        return self.layers * (self.experts * self.expert + self.dense_layer) + 2 * self.embedding + self.dim


OLMOE_1B_7B = Moe(dim=2048, layers=16, heads=16, kv_heads=16, experts=64, width=1024, vocab=50304)
OLMOE_232B = Moe(dim=4096, layers=94, heads=32, kv_heads=4, experts=128, width=1536, vocab=151936)
