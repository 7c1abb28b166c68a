"""Document masking: packed windows hold several documents; attention and, optionally, RoPE respect them.

The data path packs EOS-delimited documents into fixed windows (datasets/). With
`training.document_masking` a token attends only to earlier tokens of its own
document, so a packed window trains as if each document were alone in it (the
logits are those of each document run alone). `training.document_rope_restart`
also restarts RoPE positions at 0 in every document; without it positions run
over the window, which gives the same attention scores (RoPE depends only on the
distance between query and key, and both lie in one document) but not the same
rounding.

A document ends with its EOS token: the EOS belongs to the document it closes.
"""
from __future__ import annotations

import torch


def document_ids(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, S) index of each token's document within its window: the number of EOS tokens before it."""
    ends = (inputs == eos_id).long()
    return ends.cumsum(1) - ends


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """(B, S) position of each token inside its document (0 at every document start)."""
    seq = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return seq - torch.where(starts, seq, 0).cummax(1).values
