"""Cross-entropy summed over tokens; the trainer divides by the global token count.

Summing locally and dividing by the number of labelled tokens across all data
and context parallel ranks and micro-batches makes every layout (and gradient
accumulation) optimize exactly the same objective.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
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


def chunked_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                              z_loss_multiplier: float = 0.0) -> torch.Tensor:
    """cross_entropy_sum over chunks of tokens, each upcast to float32 and recomputed in backward.

    The plain path keeps a float32 copy of all logits alive until backward (128K vocab x 8192 tokens
    is 4 GiB); here at most one chunk's float32 logits exist at a time. Same value and gradients.
    """
    # split, not slicing: its backward concatenates the chunks' gradients once, where every slice's backward
    # would allocate a zero tensor of the full logits' size.
    total = None
    for part_logits, part_labels in zip(logits.flatten(0, 1).split(chunk_tokens), labels.flatten(0, 1).split(chunk_tokens)):
        part = torch.utils.checkpoint.checkpoint(cross_entropy_sum, part_logits.unsqueeze(0), part_labels.unsqueeze(0),
                                                 z_loss_multiplier, use_reentrant=False)
        total = part if total is None else total + part
    return total


def build_loss_fn(cfg, compile_loss: bool = False):
    """cfg: the [training] section. With fused_output_loss the result takes hidden states and needs its
    `head` bound (components/fused_loss.py)."""
    z, chunk = cfg.z_loss_multiplier, cfg.loss_chunk_size
    if cfg.fused_output_loss:
        from torchtitan.components.fused_loss import FusedOutputLoss

        return FusedOutputLoss(chunk, z, compile_chunks=compile_loss)

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if chunk > 0 and not isinstance(logits, DTensor):
            # Vocab-sharded logits (loss parallel) already hold 1/tp of the vocabulary per rank.
            return chunked_cross_entropy_sum(logits, labels, chunk, z)
        return cross_entropy_sum(logits, labels, z)

    return torch.compile(loss_fn) if compile_loss else loss_fn
