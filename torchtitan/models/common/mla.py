"""Multi-head latent attention (DeepSeek-V2/V3), the "mla" kind of the attention slot.

Queries go through an optional low-rank bottleneck (q_lora_rank, normalized), keys and values through one
shared latent (kv_lora_rank, normalized) that is expanded per head; a decoupled RoPE part (qk_rope_head_dim) is
added to each query head and, shared by every head, to the keys. The q/k head dim (nope + rope) differs from the
value head dim: values are zero-padded to the q/k width for the attention kernels (flash needs one head dim)
and the padding is cut from the output. RoPE rotates adjacent pairs (DeepSeek's interleaved layout). Under YaRN
the softmax scale carries mscale(factor, mscale_all_dim)^2, as DeepSeek's reference does.
Like grouped-query attention, it declares its init roles, TP plan and FLOPs; context parallel swaps `sdpa`.
Under tensor parallel each rank holds its heads' up-projections and computes the (replicated) latents itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import PrepareModuleInput, RowwiseParallel

from torchtitan.models.common.rope import YarnScaling, apply_rope_interleaved
from torchtitan.ops.attention import AttentionCore
from torchtitan.ops.moe import local_weight
from torchtitan.ops.rms_norm import RMSNorm, rms_norm


@dataclass
class MLAArgs:
    q_lora_rank: int = 0  # 0: queries projected directly (no low-rank bottleneck)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model args mla.{name} = {getattr(self, name)}; it must be >= 1")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"model args mla.qk_rope_head_dim = {self.qk_rope_head_dim}: RoPE needs an even width")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return F.linear(x, local_weight(layer.weight))


def _rms_norm(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
    return rms_norm(x, local_weight(norm.weight), norm.eps)


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class MultiHeadLatentAttention(nn.Module):
    kind = "mla"
    description = "multi-head latent attention"
    tensor_parallel = True

    def __init__(self, args, layer_id: int):
        super().__init__()
        m: MLAArgs = args.mla
        self.n_heads, self.m = args.n_heads, m
        h, dim = args.n_heads, args.dim
        if m.q_lora_rank:
            self.wq_a = nn.Linear(dim, m.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(m.q_lora_rank, eps=args.norm_eps)
            self.wq_b = nn.Linear(m.q_lora_rank, h * m.qk_head_dim, bias=False)
            self.wq = None
        else:
            self.wq = nn.Linear(dim, h * m.qk_head_dim, bias=False)
            self.wq_a = self.q_norm = self.wq_b = None
        self.wkv_a = nn.Linear(dim, m.kv_lora_rank + m.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(m.kv_lora_rank, eps=args.norm_eps)
        self.wkv_b = nn.Linear(m.kv_lora_rank, h * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.wo = nn.Linear(h * m.v_head_dim, dim, bias=False)
        scaling = args.layer_rope_scaling(layer_id)
        mscale = 1.0
        if isinstance(scaling, YarnScaling) and scaling.mscale_all_dim:
            mscale = _yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2
        self.q_scale = mscale if mscale != 1.0 else None
        self.qk_norm = None  # no QK-norm (models/common/parallelize.py shards a whole-width one)
        self.sdpa = AttentionCore(args.attention_mask(layer_id), args.sdpa_backend)

    def norms(self) -> list[nn.Module]:
        return [n for n in (self.q_norm, self.kv_norm) if n is not None]

    def projections(self) -> dict[str, list[torch.Tensor]]:
        ins = [self.wq.weight] if self.wq is not None else [self.wq_a.weight, self.wq_b.weight]
        return {"in": [*ins, self.wkv_a.weight, self.wkv_b.weight], "out": [self.wo.weight]}

    def reset_extras(self) -> None:
        """No biases or sinks."""

    def tp_plan(self) -> dict:
        """Heads split over the TP ranks. The module takes the whole sequence (a replicated DTensor) and the output
        projection is row-sharded back to sequence shards; the other weights are placed by `tp_placements`."""
        return {"": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                       desired_input_layouts=(Replicate(), None, None, None)),
                "wo": RowwiseParallel(output_layouts=Shard(1))}

    def tp_placements(self) -> dict[str, list]:
        """Parameter -> its tensor-parallel placement, applied by models/common/parallelize.py: the per-head
        up-projections sharded on their output rows (whole heads, as wq/wkv_b lay them out), the latent
        projections and norms replicated. Every rank computes the latents from the whole input for its own heads,
        so their gradients, and the input's, are partial sums over the ranks (`local_weight`)."""
        heads = [Shard(0)]
        out = {"wkv_b.weight": heads, "wkv_a.weight": [Replicate()], "kv_norm.weight": [Replicate()]}
        if self.wq is not None:
            out["wq.weight"] = heads
        else:
            out.update({"wq_b.weight": heads, "wq_a.weight": [Replicate()], "q_norm.weight": [Replicate()]})
        return out

    def core_flops_per_token(self, keys: int) -> float:
        """q k^T over the q/k head dim and p v over the value head dim, forward and backward."""
        return 6 * self.n_heads * (self.m.qk_head_dim + self.m.v_head_dim) * keys

    def forward(self, x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor | None,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        # Under tensor parallel x and the weights are DTensors (tp_placements): work on local values (no-ops
        # otherwise), the replicated ones with their gradients summed over the ranks.
        x = local_weight(x)
        bs, seqlen, _ = x.shape
        m = self.m
        if self.wq is not None:
            q = _linear(x, self.wq)
        else:
            q = _linear(_rms_norm(_linear(x, self.wq_a), self.q_norm), self.wq_b)
        q = q.view(bs, seqlen, -1, m.qk_head_dim)
        q_nope, q_rope = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        q = torch.cat([q_nope, apply_rope_interleaved(q_rope, rope, positions)], dim=-1)
        kv, k_rope = _linear(x, self.wkv_a).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        k_rope = apply_rope_interleaved(k_rope.unsqueeze(2), rope, positions)  # one head, shared by all
        kv = _linear(_rms_norm(kv, self.kv_norm), self.wkv_b).view(bs, seqlen, -1, m.qk_nope_head_dim + m.v_head_dim)
        k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, -1, k_nope.shape[2], -1)], dim=-1)
        if self.q_scale is not None:
            q = q * self.q_scale
        pad = m.qk_head_dim - m.v_head_dim
        if pad > 0:
            v = F.pad(v, (0, pad))
        out = self.sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), documents)
        out = out.transpose(1, 2)
        if pad > 0:
            out = out[..., :m.v_head_dim]
        return self.wo(out.reshape(bs, seqlen, -1))
