"""The pieces of a decoder block: norms, attention (with optional QK-norm and clipping), gated MLPs.

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
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel

from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.mla import MultiHeadLatentAttention
from torchtitan.models.common.moe import MoE
from torchtitan.models.common.rope import apply_rope_half, apply_rope_interleaved
from torchtitan.ops.attention import AttentionCore, attention_with_logit_max
from torchtitan.ops.moe import local_weight
from torchtitan.ops.rms_norm import RMSNorm, rms_norm

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


class PlusOneRMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + w) in float32, w starting at zero (transformers' Gemma3RMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x.float(), 1.0 + self.weight.float(), self.eps).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def build_norm(args: DecoderArgs, dim: int | None = None) -> nn.Module:
    dim = dim or args.dim
    if args.norm == "rms_plus_one":
        return PlusOneRMSNorm(dim, args.norm_eps)
    return RMSNorm(dim, eps=args.norm_eps) if args.norm == "rms" else NonParametricLayerNorm(dim, args.norm_eps)


def _qk_norm(args: DecoderArgs, dim: int) -> nn.Module:
    """QK-norms are RMSNorms: Gemma's (1 + w) one in a Gemma model, the plain one otherwise."""
    return PlusOneRMSNorm(dim, args.norm_eps) if args.norm == "rms_plus_one" else RMSNorm(dim, eps=args.norm_eps)


class Attention(nn.Module):
    """Grouped-query attention (multi-head when n_kv_heads = n_heads), the "gqa" kind of the attention slot.

    Besides computing, it declares what the rest of the code needs to know about it: its weights by role
    (`projections`, for init schemes), its tensor-parallel plan (`tp_plan`) and its attention FLOPs
    (`core_flops_per_token`). Context parallel swaps `sdpa`, the core, and nothing else.
    """

    kind = "gqa"
    description = "grouped-query attention"
    tensor_parallel = True  # tp_plan shards the heads

    def __init__(self, args: DecoderArgs, layer_id: int):
        super().__init__()
        self.n_heads, self.head_dim, self.clip_qkv, self.qk_norm = (args.n_heads, args.attn_head_dim,
                                                                     args.clip_qkv, args.qk_norm)
        self.rope = ROPE[args.rope_layout]
        q_width, kv_width = args.n_heads * self.head_dim, args.kv_heads * self.head_dim
        bias = args.attention_bias
        self.wq = nn.Linear(args.dim, q_width, bias=bias)
        self.wk = nn.Linear(args.dim, kv_width, bias=bias)
        self.wv = nn.Linear(args.dim, kv_width, bias=bias)
        self.wo = nn.Linear(q_width, args.dim, bias=bias)
        # One logit per head (tensor parallel shards it with the heads: models/common/parallelize.py).
        self.sinks = nn.Parameter(torch.empty(args.n_heads)) if args.attention_sinks else None
        if args.qk_norm == "width":
            # Over the whole projection, before the head split, as OLMo 2 and transformers' Olmo2 do.
            self.q_norm, self.k_norm = _qk_norm(args, q_width), _qk_norm(args, kv_width)
        elif args.qk_norm == "head":
            # Per head over head_dim, one weight for every head (Qwen3, Gemma 3).
            self.q_norm, self.k_norm = _qk_norm(args, self.head_dim), _qk_norm(args, self.head_dim)
        # q scaled so that the core's head_dim ** -0.5 becomes query_pre_attn_scalar ** -0.5 (Gemma 3); None where
        # they are equal (every core, context parallel's included, then sees q as is).
        scalar = args.query_pre_attn_scalar
        self.q_scale = (self.head_dim / scalar) ** 0.5 if scalar is not None and scalar != self.head_dim else None
        self.sdpa = AttentionCore(args.attention_mask(layer_id), args.sdpa_backend)
        # QK-clip (components/qk_clip.py) turns tracking on: training forwards then also keep each local head's
        # largest attention logit since the last reset (a statistic, not state: never checkpointed).
        self.track_logit_max = False
        self.logit_max: torch.Tensor | None = None

    def norms(self) -> list[nn.Module]:
        return [self.q_norm, self.k_norm] if self.qk_norm else []

    def projections(self) -> dict[str, list[torch.Tensor]]:
        """The weights by role, for init schemes: "in" (q, k, v) and "out" (o), as (out, in) matrices."""
        return {"in": [self.wq.weight, self.wk.weight, self.wv.weight], "out": [self.wo.weight]}

    def reset_extras(self) -> None:
        """What init schemes leave alone, after to_empty: projection biases and sinks start at zero (a sink of
        zero is one extra key of value zero with logit 0)."""
        for p in (self.wq.bias, self.wk.bias, self.wv.bias, self.wo.bias, self.sinks):
            if p is not None:
                nn.init.zeros_(p)

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

    def tp_placements(self) -> dict[str, list]:
        """Parameters placed outside the plan's parallel styles: the sinks, one per head, sharded with the heads
        (their gradient stays per shard)."""
        return {"sinks": [Shard(0)]} if self.sinks is not None else {}

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
        if self.q_scale is not None:
            q = q * self.q_scale
        v = v.view(bs, seqlen, -1, self.head_dim)
        # Grouped K/V heads go to the core as they are: it repeats them where its kernel needs it, and
        # context parallel passes the smaller tensors between ranks.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        sinks = self.sinks.to_local() if isinstance(self.sinks, DTensor) else self.sinks
        if self.track_logit_max and self.training:
            out, logit_max = attention_with_logit_max(q, k, v, self.sdpa.mask, documents, sinks)
            self.logit_max = logit_max if self.logit_max is None else torch.maximum(self.logit_max, logit_max)
        elif sinks is None:
            out = self.sdpa(q, k, v, documents)
        else:
            out = self.sdpa(q, k, v, documents, sinks=sinks)
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))


ATTENTION_CLASSES = {"gqa": Attention, "mla": MultiHeadLatentAttention}


def build_attention(args: DecoderArgs, layer_id: int) -> nn.Module:
    """The block's attention slot: the kind args.attention names."""
    return ATTENTION_CLASSES[args.attention](args, layer_id)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


GATES = {"swiglu": F.silu, "geglu": gelu_tanh}


class FeedForward(nn.Module):
    """Gated MLP: w2(gate(w1 x) * w3 x), gate SiLU (SwiGLU) or tanh-GELU (GeGLU); w1 is HF's gate_proj, w3 its
    up_proj."""

    is_moe = False

    def __init__(self, dim: int, hidden_dim: int, kind: str = "swiglu"):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.gate = GATES[kind]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.gate(self.w1(x)) * self.w3(x))

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

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        """forward on local values of the weights: a MoE's shared expert under tensor parallel, whose weights are
        replicated DTensors and whose tokens differ per rank (their gradients are summed over the ranks)."""
        w1, w2, w3 = (local_weight(w.weight) for w in (self.w1, self.w2, self.w3))
        return F.linear(self.gate(F.linear(x, w1)) * F.linear(x, w3), w2)


def build_feed_forward(args: DecoderArgs, layer_id: int) -> nn.Module:
    """The block's feed-forward slot: a SwiGLU, or a mixture of experts in the layers args.moe covers."""
    if args.layer_is_moe(layer_id):
        m = args.moe
        shared = FeedForward(args.dim, m.shared_expert_hidden_dim) if m.shared_expert_hidden_dim else None
        return MoE(args.dim, m, shared)
    return FeedForward(args.dim, args.ffn_hidden_dim, args.feed_forward)
