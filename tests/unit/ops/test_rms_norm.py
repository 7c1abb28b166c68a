"""The CPU RMSNorm's hand-written backward against torch's rms_norm, and where it hands over to torch's."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchtitan.ops.rms_norm import RMSNorm, rms_norm


def _grads(fn, x, w, g):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(x, w)
    y.backward(g)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("shape", [(8, 64, 256), (2, 16, 4, 32), (5, 128)])
@pytest.mark.parametrize("eps", [1e-6, None])
def test_values_and_gradients_as_accurate_as_torchs(shape, eps):
    torch.manual_seed(0)
    x, w, g = torch.randn(shape) * 3, torch.randn(shape[-1]), torch.randn(shape)
    ref = _grads(lambda a, b: F.rms_norm(a, (shape[-1],), b, eps), x.double(), w.double(), g.double())
    torchs = _grads(lambda a, b: F.rms_norm(a, (shape[-1],), b, eps), x, w, g)
    ours = _grads(lambda a, b: rms_norm(a, b, eps), x, w, g)
    assert ours[0].grad_fn is None
    for o, t, r in zip(ours, torchs, ref):
        err_ours, err_torch = (o.double() - r).abs().max().item(), (t.double() - r).abs().max().item()
        # Both are float32 roundings of the same value; ours may sum in another order, never worse by much.
        assert err_ours <= 4 * err_torch + 1e-6, (err_ours, err_torch)


def test_the_hand_written_backward_runs_on_cpu_float32():
    x, w = torch.randn(4, 8, requires_grad=True), torch.ones(8, requires_grad=True)
    assert type(rms_norm(x, w, 1e-6).grad_fn).__name__ == "_RMSNormCPUBackward"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_are_torchs_exactly(dtype):
    x, w = torch.randn(4, 8, dtype=dtype, requires_grad=True), torch.randn(8, dtype=dtype, requires_grad=True)
    y = rms_norm(x, w, 1e-6)
    assert type(y.grad_fn).__name__ != "_RMSNormCPUBackward"
    assert torch.equal(y, F.rms_norm(x, (8,), w, 1e-6))


def test_no_weight_is_torchs():
    x = torch.randn(4, 8)
    assert torch.equal(rms_norm(x, None, 1e-5), F.rms_norm(x, (8,), None, 1e-5))


def test_compiled_graph_uses_torchs_composite():
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    norm = RMSNorm(16, eps=1e-6)
    x = torch.randn(2, 3, 16, requires_grad=True)
    torch.compile(norm, backend=record, fullgraph=True)(x)
    assert "rms_norm" in graphs[0] and "autograd_function_apply" not in graphs[0]


def test_module_is_torchs_rmsnorm_with_the_same_state_dict():
    ours, torchs = RMSNorm(16, eps=1e-5), nn.RMSNorm(16, eps=1e-5)
    assert isinstance(ours, nn.RMSNorm)
    assert ours.state_dict().keys() == torchs.state_dict().keys()
    with torch.no_grad():
        ours.weight.uniform_()
    torchs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 16)
    torch.testing.assert_close(ours(x), torchs(x), rtol=1e-6, atol=1e-6)
