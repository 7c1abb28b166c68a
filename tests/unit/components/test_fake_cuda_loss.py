"""The loss paths and the output layer in bfloat16 on fake CUDA tensors (tests/fake_cuda.py): plain, chunked and
fused with the output matmul, with z-loss and ignored labels; float32 results, no CPU tensor met."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.fake_cuda import CUDA, assert_no_cpu_tensors, fake_cuda
from torchtitan.components.loss import (
    FusedOutputLoss,
    OutputHead,
    chunked_cross_entropy_sum,
    cross_entropy_sum,
    linear_cross_entropy_sum,
)

TOKENS, DIM, VOCAB = 96, 64, 512


def _labels():
    return torch.empty(2, TOKENS // 2, dtype=torch.int64, device="cuda")


@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
def test_plain_and_chunked_loss_on_cuda_bf16_logits(z_loss):
    with fake_cuda() as ops:
        logits = F.linear(torch.empty(2, TOKENS // 2, DIM, dtype=torch.bfloat16, device="cuda"),
                          torch.empty(VOCAB, DIM, dtype=torch.bfloat16, device="cuda"))
        plain = cross_entropy_sum(logits, _labels(), z_loss)
        chunked = chunked_cross_entropy_sum(logits, _labels(), 40, z_loss)
    assert logits.dtype == torch.bfloat16
    for loss in (plain, chunked):
        assert (loss.shape, loss.dtype, loss.device) == ((), torch.float32, CUDA)
    assert ops.count("nll_loss_forward") == 1 + 3  # one per chunk of 40 of 96 tokens
    assert_no_cpu_tensors(ops)


def test_fused_output_loss_on_cuda_bf16_runs_the_output_matmul_per_chunk():
    with fake_cuda() as ops:
        head = OutputHead(torch.nn.Parameter(torch.empty(VOCAB, DIM, dtype=torch.bfloat16, device="cuda")))
        loss_fn = FusedOutputLoss(chunk_tokens=32, z_loss_multiplier=1e-4)
        loss_fn.head = head
        hidden = head(torch.empty(2, TOKENS // 2, DIM, dtype=torch.bfloat16, device="cuda"))
        loss = loss_fn(hidden, _labels())
        direct = linear_cross_entropy_sum(hidden, head.weight, _labels(), 96)
    assert (loss.shape, loss.dtype, loss.device, direct.dtype) == ((), torch.float32, CUDA, torch.float32)
    assert ops.count("mm") + ops.count("addmm") == 3 + 1  # 96 tokens in chunks of 32, then in one chunk
    assert_no_cpu_tensors(ops)
