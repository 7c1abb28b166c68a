"""The pieces of a decoder block: norms, attention (with optional QK-norm and clipping), SwiGLU.

Parameter names are Meta's Llama names (attention.wq/wk/wv/wo, feed_forward.w1/w2/w3)
for every family, so parallelism plans, checkpoints and tools read the same FQNs.
Heads are reshaped with -1: under tensor parallel each rank holds a slice of the
heads and simply sees its local ones. Modules declare how they are sharded (`tp_plan`,
torch's parallel styles keyed by submodule); models/common/parallelize.py applies them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel

from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.moe import MoE
from torchtitan.models.common.rope import apply_rope_half, apply_rope_interleaved
from torchtitan.ops.attention import AttentionCore

ROPE = {"interleaved": apply_rope_interleaved, "half": apply_rope_half}


class NonParametricLayerNorm(nn.Module):
    """LayerNorm without weight or bias, computed in float32 as OLMo and transformers do."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (self.dim,), None, None, self.eps).type_as(x)

    def reset_parameters(self) -> None:
        pass

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


def build_norm(args: DecoderArgs, dim: int | None = None) -> nn.Module:
    dim = dim or args.dim
    return nn.RMSNorm(dim, eps=args.norm_eps) if args.norm == "rms" else NonParametricLayerNorm(dim, args.norm_eps)


class Attention(nn.Module):
    """Grouped-query attention (multi-head when n_kv_heads = n_heads), the "gqa" kind of the attention slot.

    Besides computing, it declares what the rest of the code needs to know about it: its weights by role
    (`projections`, for init schemes), its tensor-parallel plan (`tp_plan`) and its attention FLOPs
    (`core_flops_per_token`). Context parallel swaps `sdpa`, the core, and nothing else.
    """

    kind = "gqa"

    def __init__(self, args: DecoderArgs, layer_id: int):
        super().__init__()
        self.n_heads, self.head_dim, self.clip_qkv, self.qk_norm = (args.n_heads, args.attn_head_dim,
                                                                     args.clip_qkv, args.qk_norm)
        self.rope = ROPE[args.rope_layout]
        q_width, kv_width = args.n_heads * self.head_dim, args.kv_heads * self.head_dim
        self.wq = nn.Linear(args.dim, q_width, bias=False)
        self.wk = nn.Linear(args.dim, kv_width, bias=False)
        self.wv = nn.Linear(args.dim, kv_width, bias=False)
        self.wo = nn.Linear(q_width, args.dim, bias=False)
        if args.qk_norm == "width":
            # Over the whole projection, before the head split, as OLMo 2 and transformers' Olmo2 do.
            self.q_norm = nn.RMSNorm(q_width, eps=args.norm_eps)
            self.k_norm = nn.RMSNorm(kv_width, eps=args.norm_eps)
        elif args.qk_norm == "head":
            # Per head over head_dim, one weight for every head (Qwen3, Gemma 3).
            self.q_norm = nn.RMSNorm(self.head_dim, eps=args.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=args.norm_eps)
        self.sdpa = AttentionCore(args.attention_mask(layer_id), args.sdpa_backend)

    def norms(self) -> list[nn.Module]:
        return [self.q_norm, self.k_norm] if self.qk_norm else []

    def projections(self) -> dict[str, list[torch.Tensor]]:
        """The weights by role, for init schemes: "in" (q, k, v) and "out" (o), as (out, in) matrices."""
        return {"in": [self.wq.weight, self.wk.weight, self.wv.weight], "out": [self.wo.weight]}

    def tp_plan(self) -> dict:
        """Heads split over the TP ranks: q/k/v column-sharded, o row-sharded back to sequence shards.

        A per-head QK-norm sees its rank's heads: its weight is replicated and its input marked sharded on the
        head dim, so DTensor sums the weight's gradient over the ranks. A whole-width QK-norm needs the
        statistics of every head: distributed/tensor_parallel.py HeadShardedRMSNorm (see `shard_norms`).
        """
        plan = {
            "": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                   desired_input_layouts=(Replicate(), None, None, None)),
            "wq": ColwiseParallel(), "wk": ColwiseParallel(), "wv": ColwiseParallel(),
            "wo": RowwiseParallel(output_layouts=Shard(1)),
        }
        if self.qk_norm == "head":
            plan["q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        return plan

    def core_flops_per_token(self, keys: int) -> float:
        """Training FLOPs of q k^T and p v for one query over `keys` keys (forward and backward)."""
        return 12 * self.n_heads * self.head_dim * keys

    def forward(self, x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor | None,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        """positions: RoPE positions of the local tokens (None: 0..S-1); documents: (B, S) document ids of the
        whole sequence when attention stays inside documents."""
        bs, seqlen, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        if self.qk_norm == "width":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(bs, seqlen, -1, self.head_dim), k.view(bs, seqlen, -1, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, rope, positions), self.rope(k, rope, positions)
        v = v.view(bs, seqlen, -1, self.head_dim)
        # Grouped K/V heads go to the core as they are: it repeats them where its kernel needs it, and
        # context parallel passes the smaller tensors between ranks.
        out = self.sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), documents)
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))


ATTENTION_CLASSES = {"gqa": Attention}


def build_attention(args: DecoderArgs, layer_id: int) -> nn.Module:
    """The block's attention slot: the kind args.attention names."""
    return ATTENTION_CLASSES[args.attention](args, layer_id)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is HF's gate_proj, w3 its up_proj."""

    is_moe = False

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def projections(self) -> dict[str, list[torch.Tensor]]:
        """The weights by role, for init schemes: w1 (gate), w3 (up), w2 (down) as (out, in) matrices."""
        return {"w1": [self.w1.weight], "w3": [self.w3.weight], "w2": [self.w2.weight], "router": []}

    def tp_plan(self) -> dict:
        """Hidden units split over the TP ranks: w1/w3 column-sharded, w2 row-sharded to sequence shards."""
        return {
            "": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "w1": ColwiseParallel(), "w2": RowwiseParallel(output_layouts=Shard(1)), "w3": ColwiseParallel(),
        }

    def reset_buffers(self) -> None:
        """Non-parameter state to reset after to_empty (none)."""


def build_feed_forward(args: DecoderArgs, layer_id: int) -> nn.Module:
    """The block's feed-forward slot: a SwiGLU, or a mixture of experts in the layers args.moe covers."""
    if args.layer_is_moe(layer_id):
        m = args.moe
        shared = FeedForward(args.dim, m.shared_expert_hidden_dim) if m.shared_expert_hidden_dim else None
        return MoE(args.dim, m, shared)
    return FeedForward(args.dim, args.ffn_hidden_dim)
