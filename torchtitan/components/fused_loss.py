"""The output projection folded into a chunked cross-entropy, so the (tokens x vocab) logits never exist whole.

At seq 8192 with a 128K vocabulary the logits are 2 GiB in bf16, their float32 copy 4 GiB and their gradient
another 2 GiB. `training.loss_chunk_size` alone removes the float32 copy; with `training.fused_output_loss`
the model's `output` Linear becomes an `OutputHead` that passes the final hidden states through, and the loss
multiplies them by the output weight chunk by chunk inside activation checkpoints: forward keeps one chunk's
logits at a time, backward recomputes each chunk's logits and accumulates the weight's gradient. The price is
one more output-layer matmul per step (the recompute). Values and gradients equal the unfused loss.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from torchtitan.components.loss import cross_entropy_sum


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
        raise ValueError(f"training.fused_output_loss needs a bias-free nn.Linear output layer, not {type(linear).__name__}")
    model.output = OutputHead(linear.weight)


def _linear_ce_chunk(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, z_loss_multiplier: float) -> torch.Tensor:
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
