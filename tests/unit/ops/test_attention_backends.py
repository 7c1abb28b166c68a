"""Every SDPA backend gives the same attention; auto picks per device."""
import pytest
import torch

from torchtitan.ops.attention import AttentionCore, resolve_sdpa_backend


def qkv(seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 64, 16, generator=g, dtype=dtype).to(device).requires_grad_() for _ in range(3)]


def run(backend, device="cpu", dtype=torch.float32):
    q, k, v = qkv(dtype=dtype, device=device)
    out = AttentionCore(backend=backend)(q, k, v)
    out.square().sum().backward()
    return out.detach().float().cpu(), [t.grad.float().cpu() for t in (q, k, v)]


def reference(q, k, v):
    s = q.shape[-2]
    att = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    att = att.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return att.softmax(-1) @ v


@pytest.mark.parametrize("backend", ["default", "math", "flash"])
def test_cpu_backends_match_reference(backend):
    out, grads = run(backend)
    q, k, v = qkv()
    ref = reference(q, k, v)
    ref.square().sum().backward()
    assert torch.allclose(out, ref.detach(), atol=1e-5)
    for g, r in zip(grads, (q.grad, k.grad, v.grad)):
        assert torch.allclose(g, r, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient"])
def test_cuda_backends_match_math(backend):
    ref, ref_g = run("math", "cuda", torch.bfloat16)
    out, g = run(backend, "cuda", torch.bfloat16)
    assert torch.allclose(out, ref, atol=2e-2)
    for a, b in zip(g, ref_g):
        assert torch.allclose(a, b, atol=5e-2)


def test_resolution():
    assert resolve_sdpa_backend("auto", "cpu") == "default"
    assert resolve_sdpa_backend("math", "cpu") == "math"
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        resolve_sdpa_backend("cudnn", "cpu")
