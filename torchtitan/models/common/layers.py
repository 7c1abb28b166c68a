"""The pieces of a decoder block: norms, attention (with optional QK-norm and clipping), SwiGLU.

Parameter names are Meta's Llama names (attention.wq/wk/wv/wo, feed_forward.w1/w2/w3)
for every family, so parallelism plans, checkpoints and tools read the same FQNs.
Heads are reshaped with -1: under tensor parallel each rank holds a slice of the
heads and simply sees its local ones. Nothing here knows about parallelism.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
    def __init__(self, args: DecoderArgs, layer_id: int):
        super().__init__()
        self.head_dim, self.clip_qkv, self.qk_norm = args.head_dim, args.clip_qkv, args.qk_norm
        self.rope = ROPE[args.rope_layout]
        q_width, kv_width = args.n_heads * args.head_dim, args.kv_heads * args.head_dim
        self.wq = nn.Linear(args.dim, q_width, bias=False)
        self.wk = nn.Linear(args.dim, kv_width, bias=False)
        self.wv = nn.Linear(args.dim, kv_width, bias=False)
        self.wo = nn.Linear(q_width, args.dim, bias=False)
        if args.qk_norm:
            # Over the whole projection, before the head split, as OLMo 2 and transformers' Olmo2 do.
            self.q_norm = nn.RMSNorm(q_width, eps=args.norm_eps)
            self.k_norm = nn.RMSNorm(kv_width, eps=args.norm_eps)
        self.sdpa = AttentionCore(args.attention_mask(layer_id), args.sdpa_backend)

    def norms(self) -> list[nn.Module]:
        return [self.q_norm, self.k_norm] if self.qk_norm else []

    def forward(self, x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor | None,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        """positions: RoPE positions of the local tokens (None: 0..S-1); documents: (B, S) document ids of the
        whole sequence when attention stays inside documents."""
        bs, seqlen, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = self.rope(q.view(bs, seqlen, -1, self.head_dim), rope, positions)
        k = self.rope(k.view(bs, seqlen, -1, self.head_dim), rope, positions)
        v = v.view(bs, seqlen, -1, self.head_dim)
        # Grouped K/V heads go to the core as they are: it repeats them where its kernel needs it, and
        # context parallel passes the smaller tensors between ranks.
        out = self.sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), documents)
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is HF's gate_proj, w3 its up_proj."""

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


def build_feed_forward(args: DecoderArgs, layer_id: int) -> nn.Module:
    """The block's feed-forward slot: a SwiGLU, or a mixture of experts in the layers args.moe covers."""
    if args.layer_is_moe(layer_id):
        m = args.moe
        shared = FeedForward(args.dim, m.shared_expert_hidden_dim) if m.shared_expert_hidden_dim else None
        return MoE(args.dim, m, shared)
    return FeedForward(args.dim, args.ffn_hidden_dim)
