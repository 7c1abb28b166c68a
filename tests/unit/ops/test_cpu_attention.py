"""The explicit-score causal attention for CPU against SDPA, and which calls AttentionCore hands it."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from torchtitan.ops import cpu_attention
from torchtitan.ops.attention import AttentionCore
from torchtitan.ops.cpu_attention import causal_attention_cpu, explicit_causal_eligible
from torchtitan.ops.masks import AttentionMask


def _run(fn, q, k, v, g):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(g)
    return out.detach(), q.grad, k.grad, v.grad


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


# seq 200 leaves a partial last block; heads 8 over 2 K/V heads is GQA 4; (B, S, H, D) transposed as the model does
@pytest.mark.parametrize("b,h,hkv,s,d", [(2, 4, 4, 128, 16), (2, 8, 2, 200, 32), (1, 4, 2, 64, 64), (3, 2, 1, 7, 8)])
def test_values_and_gradients_as_accurate_as_sdpas(b, h, hkv, s, d):
    torch.manual_seed(0)
    q = torch.randn(b, s, h, d).transpose(1, 2) * 2
    k, v = torch.randn(b, s, hkv, d).transpose(1, 2) * 2, torch.randn(b, s, hkv, d).transpose(1, 2)
    g = torch.randn(b, h, s, d)
    ref = _run(_sdpa, q.double(), k.double(), v.double(), g.double())
    torchs = _run(_sdpa, q, k, v, g)
    ours = _run(causal_attention_cpu, q, k, v, g)
    for o, t, r in zip(ours, torchs, ref):
        assert o.shape == r.shape and o.dtype == torch.float32
        err_ours, err_torch = (o.double() - r).abs().max().item(), (t.double() - r).abs().max().item()
        assert err_ours <= 4 * err_torch + 1e-6, (err_ours, err_torch)


def test_output_comes_in_the_layout_the_model_reshapes_for_free():
    """The model turns (B, H, S, D) into (B, S, H * D) for its output projection: no copy may be left to it."""
    q, k, v = torch.randn(2, 8, 70, 16), torch.randn(2, 2, 70, 16), torch.randn(2, 2, 70, 16)
    out = causal_attention_cpu(q, k, v)
    assert out.shape == (2, 8, 70, 16) and out.transpose(1, 2).is_contiguous()
    assert torch.allclose(out, _sdpa(q, k, v), atol=1e-5)


def test_future_keys_get_no_weight_and_no_gradient():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 150, 8, requires_grad=True) for _ in range(3))
    out = causal_attention_cpu(q, k, v)
    out[:, :, :70].sum().backward()  # rows before 70 may only have looked at keys before 70
    assert torch.count_nonzero(k.grad[:, :, 70:]) == 0 and torch.count_nonzero(v.grad[:, :, 70:]) == 0
    assert torch.count_nonzero(v.grad[:, :, :70]) > 0


def _explicit(out: torch.Tensor) -> bool:
    return type(out.grad_fn).__name__ == "_CausalAttentionCPUBackward"


def test_attention_core_takes_it_only_for_default_backend_float32_cpu():
    q, k, v = (torch.randn(2, 4, 32, 8, requires_grad=True) for _ in range(3))
    assert _explicit(AttentionCore()(q, k, v))
    assert not _explicit(AttentionCore(backend="math")(q, k, v))
    window = AttentionCore(AttentionMask("sliding_window", window=8))
    assert not _explicit(window(q, k, v))
    with sdpa_kernel([SDPBackend.MATH]):  # a caller that asks for the math kernel gets it
        assert not _explicit(AttentionCore()(q, k, v))
    bf = [t.detach().bfloat16() for t in (q, k, v)]
    assert not explicit_causal_eligible(bf[0], bf[1])


def test_long_or_large_calls_keep_the_flash_kernel():
    assert explicit_causal_eligible(torch.empty(8, 8, 512, 32), torch.empty(8, 4, 512, 32))
    assert not explicit_causal_eligible(torch.empty(1, 1, cpu_attention.MAX_SEQ + 1, 8),
                                        torch.empty(1, 1, cpu_attention.MAX_SEQ + 1, 8))
    assert not explicit_causal_eligible(torch.empty(64, 8, 1024, 8), torch.empty(64, 8, 1024, 8))  # 1 GiB kept


def test_compiled_graph_keeps_it_as_one_op_with_eager_values_and_gradients():
    """torch.compile sees one opaque call (no unrolled block loop, no SDPA), and through AOT autograd it gives
    eager's output and gradients."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 150, 8), torch.randn(2, 2, 150, 8), torch.randn(2, 2, 150, 8)
    g = torch.randn(2, 4, 150, 8)
    torch.compile(AttentionCore(), backend=record, fullgraph=True)(q, k, v)
    assert "torchtitan.cpu_causal_attention" in graphs[0] and "scaled_dot_product" not in graphs[0]
    eager = _run(AttentionCore(), q, k, v, g)
    compiled = _run(torch.compile(AttentionCore(), backend="aot_eager", fullgraph=True), q, k, v, g)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_fake_shapes_and_strides_match_the_real_op():
    """The fake kernels compile plans with must describe what the real ones return (layouts included)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    # (B, S, H, D) transposed, as the model passes them: a fake kernel must not copy its inputs' layouts
    q, k, v = (torch.randn(2, 150, h, 8).transpose(1, 2) for h in (4, 2, 2))

    def both(q, k, v):
        out, qs, kg, vg, out_grouped, probs = cpu_attention._forward(q, k, v)
        grads = cpu_attention._backward(torch.empty_like(out), qs, kg, vg, out_grouped, probs)
        return [out, qs, kg, vg, out_grouped, *probs, *grads]

    real = both(q, k, v)
    with FakeTensorMode() as mode:
        fake = both(*(mode.from_tensor(t) for t in (q, k, v)))
    assert len(real) == len(fake) == 5 + 3 + 3  # 150 positions: blocks of 64, 64 and 22
    for a, b in zip(real, fake):
        assert (a.shape, a.stride(), a.dtype) == (b.shape, b.stride(), b.dtype)
    # torch's own checks of a custom op: schema, autograd registration, fake kernel, AOT dispatch
    checks = torch.library.opcheck(cpu_attention._forward, tuple(t.requires_grad_() for t in (q, k, v)))
    assert set(checks.values()) == {"SUCCESS"}, checks


def test_compiled_under_selective_op_checkpointing_gives_eager_gradients():
    from torchtitan.config.job_config import ActivationCheckpoint
    from torchtitan.distributed.activation_checkpoint import wrap_block

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 150, 8), torch.randn(2, 2, 150, 8), torch.randn(2, 2, 150, 8)
    g = torch.randn(2, 4, 150, 8)
    core = wrap_block(AttentionCore(), ActivationCheckpoint(mode="selective", selective_ac_option="op"), 0)
    compiled = _run(torch.compile(core, backend="aot_eager", fullgraph=True), q, k, v, g)
    for a, b in zip(_run(AttentionCore(), q, k, v, g), compiled):
        assert torch.equal(a, b)


def test_selective_op_checkpointing_recomputes_it_to_the_same_gradients():
    """The op-level policy keeps matmul outputs and hands them back on recompute: they must come back unchanged
    (a masked_fill_ on the scores made torch refuse the cached tensor)."""
    from torchtitan.config.job_config import ActivationCheckpoint
    from torchtitan.distributed.activation_checkpoint import wrap_block

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 150, 8), torch.randn(2, 2, 150, 8), torch.randn(2, 2, 150, 8)
    g = torch.randn(2, 4, 150, 8)
    plain = _run(AttentionCore(), q, k, v, g)
    core = wrap_block(AttentionCore(), ActivationCheckpoint(mode="selective", selective_ac_option="op"), 0)
    checkpointed = _run(core, q, k, v, g)
    for a, b in zip(plain, checkpointed):
        assert torch.equal(a, b)
