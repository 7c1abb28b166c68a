"""Cross-entropy summed over tokens; the trainer divides by the global token count.

Summing locally and dividing by the number of labelled tokens across all data
and context parallel ranks and micro-batches makes every layout (and gradient
accumulation) optimize exactly the same objective.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, z_loss_multiplier: float = 0.0) -> torch.Tensor:
    flat = logits.flatten(0, 1).float()
    labels = labels.flatten(0, 1)
    loss = F.cross_entropy(flat, labels, reduction="sum", ignore_index=IGNORE_INDEX)
    if isinstance(loss, DTensor):
        # Under loss_parallel the loss is a replicated DTensor; callers add it to plain tensors and all-reduce it.
        loss = loss.full_tensor()
    if z_loss_multiplier:
        # PaLM/OLMo 2 z-loss: keeps the softmax normalizer near 1 for stability.
        lse = _logsumexp(flat)
        loss = loss + z_loss_multiplier * (lse.pow(2) * (labels != IGNORE_INDEX)).sum()
    return loss


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim; on vocab-sharded logits (loss parallel) without gathering them."""
    if not isinstance(x, DTensor):
        return torch.logsumexp(x, dim=-1)
    m = x.detach().amax(dim=-1, keepdim=True)  # any shift gives the same value and gradient
    return ((x - m).exp().sum(dim=-1).log() + m.squeeze(-1)).full_tensor()


def build_loss_fn(cfg, compile_loss: bool = False):
    """cfg: the [training] section."""
    z = cfg.z_loss_multiplier

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy_sum(logits, labels, z)

    return torch.compile(loss_fn) if compile_loss else loss_fn
