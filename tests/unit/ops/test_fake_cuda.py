"""The CUDA-only branches of attention and the experts' grouped matmul, run on fake CUDA tensors (tests/fake_cuda.py):
the kernel each pair takes on CUDA, forward and the explicit backward calls, in the shapes and dtypes the trainer
passes, with no CPU tensor met."""
from __future__ import annotations

import pytest
import torch

from tests.fake_cuda import CUDA, Ctx, assert_no_cpu_tensors, assert_on_cuda, fake_cuda
from torchtitan.ops import attention as attention_mod
from torchtitan.ops import grouped_mm as grouped_mm_mod
from torchtitan.ops.attention import AttentionCore, resolve_sdpa_backend
from torchtitan.ops.blockwise import (
    MASKED,
    SKIP,
    BlockPlan,
    BlockwiseAttention,
    Kernel,
    kernel_for,
    pair_kind,
    tiles,
)
from torchtitan.ops.masks import CAUSAL, AttentionMask

FLASH = "_scaled_dot_product_flash_attention"
FLASH_BWD = "_scaled_dot_product_flash_attention_backward"
SEQ, TILE = 2048, 1024  # two tiles: a causal, a full (or masked) and a causal pair
WINDOW = AttentionMask("sliding_window", window=1536)  # keeps the diagonal pairs causal, masks the off-diagonal one


def _qkv(head_dim: int = 64, dtype=torch.bfloat16, heads: int = 4, kv_heads: int = 2, seq: int = SEQ):
    # (B, H, S, D) views of (B, S, H, D), as the attention layer hands them over after RoPE
    q = torch.empty(2, seq, heads, head_dim, dtype=dtype, device="cuda").transpose(1, 2)
    k = torch.empty(2, seq, kv_heads, head_dim, dtype=dtype, device="cuda").transpose(1, 2)
    v = torch.empty(2, seq, kv_heads, head_dim, dtype=dtype, device="cuda").transpose(1, 2)
    return q, k, v


def _pairs(mask: AttentionMask, documents: bool, seq: int = SEQ) -> list[str]:
    spans = tiles(seq, TILE)
    return [kind for k in spans for q in spans if (kind := pair_kind(mask, q, k, documents)) != SKIP]


def _forward_backward(q, k, v, mask: AttentionMask, documents=None, sinks=None):
    """BlockwiseAttention's forward then backward, as autograd would call them (autograd itself cannot run on
    fake CUDA tensors)."""
    spans = tiles(q.shape[2], TILE)
    plan = BlockPlan(mask, spans, (spans,), None, kernel_for(q))
    ctx = Ctx()
    out = BlockwiseAttention.forward(ctx, q, k, v, documents, plan, sinks)
    grads = BlockwiseAttention.backward(ctx, torch.empty_like(out))
    return plan, out, grads


@pytest.mark.parametrize("mask,documents", [(CAUSAL, False), (WINDOW, False), (CAUSAL, True), (WINDOW, True)],
                         ids=["causal", "sliding_window", "documents", "window_and_documents"])
def test_blockwise_on_cuda_runs_flash_per_unmasked_pair_and_math_on_masked_pairs(mask, documents):
    kinds = _pairs(mask, documents)
    with fake_cuda() as ops:
        q, k, v = _qkv()
        docs = torch.zeros(2, SEQ, dtype=torch.int64, device="cuda") if documents else None
        plan, out, (dq, dk, dv, *_) = _forward_backward(q, k, v, mask, docs)
    assert plan.kernel == Kernel("flash")
    unmasked = sum(kind != MASKED for kind in kinds)
    assert ops.count(FLASH) == unmasked and ops.count(FLASH_BWD) == unmasked
    # The masked pairs' math kernel: one logsumexp per masked pair in forward.
    assert ops.count("logsumexp") == len(kinds) - unmasked
    assert len(kinds) - unmasked == {(CAUSAL, False): 0, (WINDOW, False): 1}.get((mask, documents), 3)
    assert (out.shape, out.dtype) == (q.shape, torch.bfloat16)
    for g, x in ((dq, q), (dk, k), (dv, v)):
        assert (g.shape, g.dtype) == (x.shape, torch.bfloat16)  # GQA: K/V gradients folded back to 2 heads
    assert_on_cuda(out, dq, dk, dv)
    assert_no_cpu_tensors(ops)


@pytest.mark.parametrize("head_dim,dtype", [(320, torch.bfloat16), (64, torch.float32), (60, torch.bfloat16)],
                         ids=["head_dim_320", "float32", "head_dim_not_multiple_of_8"])
def test_blockwise_on_cuda_falls_back_to_math_where_flash_does_not_apply(head_dim, dtype):
    with fake_cuda() as ops:
        q, k, v = _qkv(head_dim, dtype, seq=1536)
        plan, out, (dq, dk, dv, *_) = _forward_backward(q, k, v, WINDOW)
    assert plan.kernel == Kernel("math")
    assert ops.count(FLASH) == 0 and ops.count(FLASH_BWD) == 0
    assert ops.count("logsumexp") == len(_pairs(WINDOW, False, 1536))
    assert (out.shape, out.dtype, dq.dtype, dk.shape) == (q.shape, dtype, dtype, k.shape)
    assert_on_cuda(out, dq, dk, dv)
    assert_no_cpu_tensors(ops)


def test_kernel_choice_on_cuda_at_the_flash_head_dim_limit():
    with fake_cuda():
        assert kernel_for(torch.empty(1, 1, 8, 256, dtype=torch.bfloat16, device="cuda")) == Kernel("flash")
        assert kernel_for(torch.empty(1, 1, 8, 264, dtype=torch.float16, device="cuda")) == Kernel("math")


def test_attention_core_on_cuda_sliding_window_and_documents_go_blockwise_with_flash():
    core = AttentionCore(WINDOW, backend="cudnn")
    with fake_cuda() as ops:
        q, k, v = _qkv()
        out = core(q, k, v)
        out_docs = AttentionCore(CAUSAL)(q, k, v, torch.zeros(2, SEQ, dtype=torch.int64, device="cuda"))
    assert ops.count(FLASH) == 2  # the window's two diagonal pairs; documents mask every pair
    assert (out.shape, out.dtype, out_docs.shape) == (q.shape, torch.bfloat16, q.shape)
    assert_on_cuda(out, out_docs)
    assert_no_cpu_tensors(ops)


@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient", "math"])
def test_attention_core_causal_on_cuda_enables_only_the_chosen_sdpa_backend(backend, monkeypatch):
    enabled = {}

    def spy(q, k, v, is_causal, enable_gqa=False):
        enabled.update(cudnn=torch.backends.cuda.cudnn_sdp_enabled(), flash=torch.backends.cuda.flash_sdp_enabled(),
                       efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
                       math=torch.backends.cuda.math_sdp_enabled())
        # GQA heads go to flash as they are; the other kernels take them repeated up to the query heads
        assert is_causal and enable_gqa == (backend == "flash") and (k.shape[1] == q.shape[1]) != enable_gqa
        return torch.empty_like(q)

    monkeypatch.setattr(attention_mod.F, "scaled_dot_product_attention", spy)
    with fake_cuda() as ops:
        out = AttentionCore(CAUSAL, backend)(*_qkv(seq=256))
    assert enabled == {name: name == backend for name in enabled}
    assert out.device == CUDA
    assert_no_cpu_tensors(ops)


def test_sdpa_fused_kernels_accept_the_trainer_causal_shapes_on_cuda():
    """What SDPA would call on a GPU for AttentionCore's causal path (the CPU build's SDPA dispatcher always
    picks the math kernel for fake CUDA tensors, so the fused ops are called directly)."""
    with fake_cuda() as ops:
        q, k, v = _qkv(128, heads=4, kv_heads=4, seq=512)
        cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)
        efficient = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, True)
        flash = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False)
    for out, lse in ((cudnn[0], cudnn[1]), (efficient[0], efficient[1]), (flash[0], flash[1])):
        assert (out.shape, out.dtype, lse.dtype) == (q.shape, torch.bfloat16, torch.float32)
        assert lse.shape[:3] == q.shape[:3]
    assert_no_cpu_tensors(ops)


def test_flash_takes_grouped_kv_heads_as_they_are_on_cuda():
    """AttentionCore's flash path passes enable_gqa: the flash op and its backward take 2 K/V heads for 4 query
    heads and return K/V gradients of the K/V heads' shape (no repeated copy)."""
    with fake_cuda() as ops:
        q, k, v = _qkv(128, heads=4, kv_heads=2, seq=512)
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            torch.empty_like(out[0]), q, k, v, out[0], out[1], out[2], out[3], out[4], out[5], 0.0, True, out[6],
            out[7])
    assert out[0].shape == q.shape and [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert_no_cpu_tensors(ops)


def test_auto_backend_on_cuda_is_cudnn_on_hopper_and_flash_before(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert resolve_sdpa_backend("auto", "cuda") == "cudnn"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert resolve_sdpa_backend("auto", "cuda") == "flash"
    assert resolve_sdpa_backend("efficient", "cuda") == "efficient"


# ---------------------------------------------------------------- grouped experts
COUNTS = [5, 0, 20, 12]  # shapes only: 37 rows in 4 groups


def _experts_inputs(dtype=torch.bfloat16):
    x = torch.empty(sum(COUNTS), 64, dtype=dtype, device="cuda")
    w = torch.empty(len(COUNTS), 96, 64, dtype=dtype, device="cuda")  # (G, N, K): nn.Linear-style weights
    # Fake tensors hold no values: the padded path must not need them (it has no host sync).
    return x, w, torch.empty(len(COUNTS), dtype=torch.int64, device="cuda")


def test_grouped_mm_on_cuda_bf16_runs_torch_grouped_mm_on_the_padded_buffer(monkeypatch):
    calls = []
    real = torch._grouped_mm

    def spy(a, b, offs):
        calls.append((a.shape, b.shape, a.dtype, offs.dtype, offs.shape, a.device, b.device, offs.device))
        return real(a, b, offs=offs)

    monkeypatch.setattr(grouped_mm_mod.torch, "_grouped_mm", spy)
    with fake_cuda() as ops:
        x, w, counts = _experts_inputs()
        out = grouped_mm_mod.grouped_mm(x, w, counts)
    rows = sum(COUNTS) + len(COUNTS) * (grouped_mm_mod._ALIGN_ROWS - 1)  # the static upper bound, no host sync
    assert calls == [((rows, 64), (4, 64, 96), torch.bfloat16, torch.int32, (4,), CUDA, CUDA, CUDA)]
    assert (out.shape, out.dtype, out.device) == ((sum(COUNTS), 96), torch.bfloat16, CUDA)
    assert "_local_scalar_dense" not in ops.ops
    assert_no_cpu_tensors(ops)


def test_grouped_mm_padded_path_backward_ops_on_cuda_bf16():
    """The gradients of the padded path, op by op as autograd would run them: through the gather, the grouped
    matmul (input gradient: grouped by rows again; weight gradient: the (K, rows) x (rows, N) grouped form)
    and the scatter into the buffer."""
    with fake_cuda() as ops:
        x, w, counts = _experts_inputs()
        n_rows, align = x.shape[0], grouped_mm_mod._ALIGN_ROWS
        padded = (counts + align - 1) // align * align
        offs = torch.cumsum(padded, 0).to(torch.int32)
        dest = torch.arange(n_rows, device="cuda")
        buf = x.new_zeros(n_rows + len(COUNTS) * (align - 1), x.shape[1]).index_copy(0, dest, x)
        grad_out = torch.empty(n_rows, w.shape[1], dtype=torch.bfloat16, device="cuda")
        grad_y = buf.new_zeros(buf.shape[0], w.shape[1]).index_put_((dest,), grad_out, accumulate=True)
        grad_buf = torch._grouped_mm(grad_y, w, offs=offs)
        grad_wt = torch._grouped_mm(buf.transpose(0, 1), grad_y, offs=offs)
        grad_x = grad_buf.index_select(0, dest)
    assert (grad_x.shape, grad_x.dtype) == (x.shape, torch.bfloat16)
    assert (grad_wt.transpose(-2, -1).shape, grad_wt.dtype) == (w.shape, torch.bfloat16)
    assert_on_cuda(grad_x, grad_wt)
    assert_no_cpu_tensors(ops)


def test_grouped_mm_on_cuda_outside_bf16_takes_the_loop(monkeypatch):
    taken = []
    monkeypatch.setattr(grouped_mm_mod, "grouped_mm_loop", lambda x, w, c: taken.append(x.dtype) or x)
    monkeypatch.setattr(grouped_mm_mod, "_grouped_mm_cuda", lambda x, w, c: pytest.fail("bf16-only path taken"))
    with fake_cuda():
        x, w, counts = _experts_inputs(torch.float32)
        grouped_mm_mod.grouped_mm(x, w, counts)
    assert taken == [torch.float32]
