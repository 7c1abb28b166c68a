"""Grouped matrix multiply for experts: rows grouped by expert, each group times its expert's weight.

On CUDA in bfloat16 this is torch._grouped_mm (one kernel for every expert); elsewhere a loop over the
experts with one matmul each, which is exact and what CPU runs. Both take the same arguments, so the
experts module does not know which one runs; tests/unit/ops/test_grouped_mm.py compares them.
"""
from __future__ import annotations

import torch

# torch._grouped_mm loads each group with 16-byte TMA tiles, also along the token dim in the weight-gradient
# matmul: groups are padded to a multiple of 8 rows in bfloat16 (padding rows are zeros and never read back).
_ALIGN_ROWS = 8


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x: (T, K) rows sorted by group; w: (G, N, K), one nn.Linear-style weight per group; counts: (G,) rows
    per group (sum T). Returns (T, N): rows of group g times w[g]^T."""
    if x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        return _grouped_mm_cuda(x, w, counts)
    return grouped_mm_loop(x, w, counts)


def grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """One matmul per group (reads the counts on the host)."""
    outs, start = [], 0
    for g, n in enumerate(counts.tolist()):
        outs.append(x[start:start + n] @ w[g].transpose(0, 1))
        start += n
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[1])


def _grouped_mm_cuda(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm over groups padded to _ALIGN_ROWS rows, without a host sync: the padded buffer has a
    static upper bound of rows."""
    n_groups, n_rows = counts.numel(), x.shape[0]
    counts = counts.to(torch.int64)
    padded = (counts + _ALIGN_ROWS - 1) // _ALIGN_ROWS * _ALIGN_ROWS
    start = torch.cumsum(counts, 0) - counts
    padded_start = torch.cumsum(padded, 0) - padded
    group = torch.repeat_interleave(torch.arange(n_groups, device=x.device), counts, output_size=n_rows)
    dest = torch.arange(n_rows, device=x.device) - start[group] + padded_start[group]
    buf = x.new_zeros(n_rows + n_groups * (_ALIGN_ROWS - 1), x.shape[1]).index_copy(0, dest, x)
    offsets = torch.cumsum(padded, 0).to(torch.int32)
    return torch._grouped_mm(buf, w.transpose(-2, -1), offs=offsets)[dest]
