"""The experts' grouped matmul: the per-expert loop (CPU), torch._grouped_mm, and the padded-group path CUDA runs
agree, forward and backward, with empty and uneven groups."""
from __future__ import annotations

import pytest
import torch

from torchtitan.ops.grouped_mm import _grouped_mm_cuda, grouped_mm, grouped_mm_loop

COUNTS = [5, 0, 20, 12]  # an expert without tokens, group sizes not multiples of the 8-row alignment


def _inputs(dtype: torch.dtype, device: str = "cpu"):
    torch.manual_seed(0)
    x = torch.randn(sum(COUNTS), 16, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(len(COUNTS), 32, 16, dtype=dtype, device=device, requires_grad=True)
    return x, w, torch.tensor(COUNTS, device=device)


def _forward_backward(fn, x, w, counts):
    out = fn(x, w, counts)
    (out * torch.arange(out.numel(), device=out.device, dtype=out.dtype).view_as(out).sin()).sum().backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    return out.detach(), *grads


def test_loop_is_each_group_times_its_weight():
    x, w, counts = _inputs(torch.float64)
    out = grouped_mm_loop(x, w, counts)
    start = 0
    for g, n in enumerate(COUNTS):
        torch.testing.assert_close(out[start:start + n], x[start:start + n] @ w[g].T, rtol=0, atol=0)
        start += n


def test_padded_path_and_torch_grouped_mm_equal_the_loop_on_cpu():
    """torch._grouped_mm has a CPU kernel (16-byte aligned float32) in the torch versions we support: the padded
    path CUDA runs is checked here against the loop, forward and backward."""
    x, w, counts = _inputs(torch.float32)
    ref = _forward_backward(grouped_mm_loop, x, w, counts)
    for got in (_forward_backward(_grouped_mm_cuda, x, w, counts),
                _forward_backward(lambda a, b, c: torch._grouped_mm(a, b.transpose(-2, -1),
                                                                    offs=torch.cumsum(c, 0).int()), x, w, counts)):
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_dispatch_uses_the_loop_on_cpu():
    x, w, counts = _inputs(torch.float32)
    assert torch.equal(grouped_mm(x, w, counts), grouped_mm_loop(x, w, counts))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: torch._grouped_mm in bfloat16")
def test_cuda_bf16_grouped_mm_matches_the_loop():
    x, w, counts = _inputs(torch.bfloat16, "cuda")
    ref = _forward_backward(grouped_mm_loop, x, w, counts)
    got = _forward_backward(grouped_mm, x, w, counts)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-1)
