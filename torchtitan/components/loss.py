"""Cross-entropy summed over tokens; the trainer divides by the global token count.

Summing locally and dividing by the number of labelled tokens across all data
and context parallel ranks and micro-batches makes every layout (and gradient
accumulation) optimize exactly the same objective.

Memory: at seq 8192 with a 128K vocabulary the logits are 2 GiB in bf16, their
float32 copy 4 GiB and their gradient another 2 GiB. `training.loss_chunk_size`
computes the loss chunk by chunk, so the float32 copy never exists whole; with
`training.fused_output_loss` the model's `output` Linear becomes an `OutputHead`
that passes the final hidden states through, and the loss multiplies them by the
output weight chunk by chunk inside activation checkpoints: no logits tensor
exists whole, for one more output-layer matmul per step (the recompute). Values
and gradients equal the plain loss.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.distributed.tensor import DTensor

from torchtitan.config.job_config import Training
from torchtitan.datasets import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "FusedOutputLoss", "OutputHead", "build_loss_fn", "chunked_cross_entropy_sum",
           "cross_entropy_sum", "fuse_output_into_loss", "linear_cross_entropy_sum", "logprob_sums"]


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
    for part_logits, part_labels in zip(logits.flatten(0, 1).split(chunk_tokens),
                                        labels.flatten(0, 1).split(chunk_tokens)):
        part = torch.utils.checkpoint.checkpoint(cross_entropy_sum, part_logits.unsqueeze(0), part_labels.unsqueeze(0),
                                                 z_loss_multiplier, use_reentrant=False)
        total = part if total is None else total + part
    return total


class OutputHead(nn.Module):
    """Holds the output weight under the same name (`output.weight`: checkpoints do not change); applies nothing."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # Still called by the model, so FSDP gathers the weight here and keeps it gathered for the loss
        # (the norm + output unit is never resharded after forward).
        return h


def fuse_output_into_loss(model: nn.Module) -> None:
    """Replace `model.output` (a bias-free Linear) by an OutputHead sharing its weight (and any tie)."""
    linear = model.output
    if not isinstance(linear, nn.Linear) or linear.bias is not None:
        raise ValueError("training.fused_output_loss needs a bias-free nn.Linear output layer, not "
                         f"{type(linear).__name__}")
    model.output = OutputHead(linear.weight)


def _linear_ce_chunk(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     z_loss_multiplier: float) -> torch.Tensor:
    return cross_entropy_sum(F.linear(h, weight).unsqueeze(0), labels.unsqueeze(0), z_loss_multiplier)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                             z_loss_multiplier: float = 0.0, chunk_fn: Callable = _linear_ce_chunk) -> torch.Tensor:
    """cross_entropy_sum(hidden @ weight.T, labels), one checkpointed chunk of `chunk_tokens` tokens at a time."""
    total = None
    for part_h, part_labels in zip(hidden.flatten(0, 1).split(chunk_tokens), labels.flatten(0, 1).split(chunk_tokens)):
        part = torch.utils.checkpoint.checkpoint(chunk_fn, part_h, weight, part_labels, z_loss_multiplier,
                                                 use_reentrant=False)
        total = part if total is None else total + part
    return total


class FusedOutputLoss:
    """loss_fn(hidden, labels) for a model whose output layer was fused into the loss.

    `head` is bound by the trainer once the model part holding it exists: pipelining builds that part
    after the loss function, and FSDP swaps the gathered weight into the head during forward.
    """

    def __init__(self, chunk_tokens: int, z_loss_multiplier: float = 0.0, compile_chunks: bool = False) -> None:
        self.head: OutputHead | None = None
        self.chunk_tokens, self.z_loss_multiplier = chunk_tokens, z_loss_multiplier
        self._chunk_fn = torch.compile(_linear_ce_chunk) if compile_chunks else _linear_ce_chunk

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("FusedOutputLoss called before its output head was bound (set loss_fn.head)")
        return linear_cross_entropy_sum(hidden, self.head.weight, labels, self.chunk_tokens, self.z_loss_multiplier,
                                        self._chunk_fn)


def logprob_sums(pred: torch.Tensor, targets: torch.Tensor, head: OutputHead | None = None,
                 chunk_tokens: int = 8192) -> torch.Tensor:
    """(B, K) float64: for each row and each of its K target columns (targets (B, S, K), IGNORE_INDEX where
    unlabelled), the summed log-probability of the labelled tokens. pred: logits (B, S, V), vocab-sharded under
    loss parallel, or hidden states when the output layer was fused into the loss (`head` holds its weight).
    Rows go a few at a time, so at most chunk_tokens tokens' float32 logits exist at once."""
    if isinstance(pred, DTensor):
        pred = pred.full_tensor()
    rows = max(1, chunk_tokens // max(pred.shape[1], 1))
    out = []
    for p, t in zip(pred.split(rows), targets.split(rows)):
        logits = (F.linear(p, head.weight) if head is not None else p)
        if isinstance(logits, DTensor):
            logits = logits.full_tensor()
        logits = logits.float()
        lp = logits.gather(-1, t.clamp(min=0)) - logits.logsumexp(-1, keepdim=True)
        out.append(lp.masked_fill(t == IGNORE_INDEX, 0.0).double().sum(1))
    return torch.cat(out)


def build_loss_fn(cfg: Training, compile_loss: bool = False):
    """cfg: the [training] section. With fused_output_loss the result takes hidden states and needs its
    `head` bound (see FusedOutputLoss)."""
    z, chunk = cfg.z_loss_multiplier, cfg.loss_chunk_size
    if cfg.fused_output_loss:
        return FusedOutputLoss(chunk, z, compile_chunks=compile_loss)

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if chunk > 0 and not isinstance(logits, DTensor):
            # Vocab-sharded logits (loss parallel) already hold 1/tp of the vocabulary per rank.
            return chunked_cross_entropy_sum(logits, labels, chunk, z)
        return cross_entropy_sum(logits, labels, z)

    return torch.compile(loss_fn) if compile_loss else loss_fn
