"""QK-clip (MuonClip, Kimi K2): keep every head's largest attention logit at or under a threshold.

An attention logit is q.k / sqrt(d). With Muon, q and k weights can grow until logits blow up and training
spikes; QK-clip caps them at the source. Each training forward keeps, per head, its largest logit
(models/common/layers.py Attention, from the scores the output is computed with: no extra pass). After the
optimizer step, a head h whose largest logit S_h over the step's global batch exceeded the threshold t is
scaled by gamma_h = t / S_h: with as many K/V heads as query heads, its query and key rows each by
sqrt(gamma_h); with grouped K/V heads (shared by several query heads) its query rows alone by gamma_h. Either
way the head's logits on the same inputs scale by gamma_h, to the threshold; other heads are untouched.

Across ranks: the maxima are reduced (MAX) over the ranks holding the layer (data-parallel replicas see other
samples; tensor parallel ranks other heads), then each rank scales its own shard's rows. A skipped step
(non-finite gradients, spike guard) clips nothing. Logged: qk_clip/max_logit (the largest over layers and heads
this step) and qk_clip/heads_clipped.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from torchtitan.config.job_config import Optimizer as OptimizerConfig
from torchtitan.distributed.utils import mesh_group
from torchtitan.models.common.layers import Attention


def _rows(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The local tensor of a (rows, ...) parameter and its first row's global index."""
    if isinstance(p, DTensor):
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return p.to_local(), offset[0]
    return p, 0


def _tp_rank(p: torch.Tensor) -> int:
    if isinstance(p, DTensor) and "tp" in (p.device_mesh.mesh_dim_names or ()):
        return p.device_mesh.get_local_rank("tp")
    return 0


class QKClip:
    """Built by the trainer when optimizer.qk_clip_threshold is set; `apply` runs after every optimizer step."""


    def __init__(self, threshold: float, model_parts: list[nn.Module]):
        self.threshold = threshold
        self.layers = [m for part in model_parts for m in part.modules() if isinstance(m, Attention)]
        for m in self.layers:
            m.track_logit_max = True
        self.max_logit = torch.zeros(())
        self.heads_clipped = torch.zeros(())

    @torch.no_grad()
    def apply(self, skip: torch.Tensor | None) -> None:
        """After the optimizer step: scale the heads over the threshold; reset the tracked maxima."""
        if not self.layers:
            return
        maxima = torch.stack([self._global_max(m) for m in self.layers])  # (layers, heads)
        self._reduce(maxima)
        gamma = (self.threshold / maxima).clamp(max=1.0)
        gamma = torch.where(torch.isfinite(gamma) & (gamma > 0), gamma, torch.ones_like(gamma))
        if skip is not None:
            gamma = torch.where(skip, torch.ones_like(gamma), gamma)
        for m, g in zip(self.layers, gamma):
            self._scale(m, g)
            m.logit_max = None
        self.max_logit = maxima.max()
        self.heads_clipped = (gamma < 1).sum()

    def _global_max(self, m: Attention) -> torch.Tensor:
        """(n_heads,) this rank's maxima at the heads' global indices (-inf for heads of other TP ranks)."""
        w, _ = _rows(m.wq.weight)
        out = torch.full((m.n_heads,), float("-inf"), device=w.device)
        if m.logit_max is not None:
            local = m.logit_max.to(out.dtype)
            start = _tp_rank(m.wq.weight) * local.numel()  # tensor parallel: each rank computes its heads
            out[start:start + local.numel()] = local
        return out

    def _reduce(self, maxima: torch.Tensor) -> None:
        w = self.layers[0].wq.weight
        if isinstance(w, DTensor) and dist.is_initialized():
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=mesh_group(w.device_mesh))

    @staticmethod
    def _scale(m: Attention, gamma: torch.Tensor) -> None:
        mha = m.wk.weight.shape[0] == m.wq.weight.shape[0]
        q_factor = gamma.sqrt() if mha else gamma
        targets = [(m.wq, q_factor)] + ([(m.wk, gamma.sqrt())] if mha else [])
        for linear, factor in targets:
            for p in (linear.weight, linear.bias):
                if p is None:
                    continue
                local, first = _rows(p)
                heads = (torch.arange(local.shape[0], device=local.device) + first) // m.head_dim
                local.mul_(factor[heads].to(local.dtype).view(-1, *([1] * (local.ndim - 1))))

    def metrics(self) -> dict:
        """The last step's statistics (a host sync: read at log steps only)."""
        return {"qk_clip/max_logit": float(self.max_logit), "qk_clip/heads_clipped": int(self.heads_clipped)}


def build_qk_clip(cfg: OptimizerConfig, model_parts: list[nn.Module]) -> QKClip | None:
    return QKClip(cfg.qk_clip_threshold, model_parts) if cfg.qk_clip_threshold is not None else None
