"""The chunked cross-entropy gives the plain one's value and gradients."""
import pytest
import torch

from torchtitan.components.loss import IGNORE_INDEX, build_loss_fn, cross_entropy_sum
from torchtitan.config.job_config import Training


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("z", [0.0, 1e-4])
def test_chunked_matches_plain(dtype, tol, z):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 37, 101, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 101, (3, 37), generator=g)
    labels[0, :5] = IGNORE_INDEX
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    plain = cross_entropy_sum(a, labels, z)
    chunked = build_loss_fn(Training(loss_chunk_size=16, z_loss_multiplier=z))(b, labels)
    plain.backward()
    chunked.backward()
    assert torch.allclose(chunked, plain, rtol=1e-6, atol=1e-4)
    assert torch.allclose(b.grad.float(), a.grad.float(), atol=tol)


def test_chunk_size_zero_is_plain():
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    assert torch.equal(build_loss_fn(Training())(logits, labels), cross_entropy_sum(logits, labels))
