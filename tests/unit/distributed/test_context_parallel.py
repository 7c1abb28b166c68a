"""Context parallel kernels in one process: each simulated rank's output equals its rows of full causal attention."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchtitan.distributed.context_parallel import (
    _global_order, chunk_ids, chunked_attention, masked_attention, shard_sequence)


def test_shard_sequence_load_balances_and_covers_every_token():
    inputs = torch.arange(2 * 16).view(2, 16)
    labels = inputs + 100
    seen = []
    for rank in range(4):
        x, y, pos = shard_sequence(inputs, labels, 4, rank)
        assert x.shape == (2, 4) and pos.shape == (2, 4)
        assert torch.equal(x, inputs.gather(1, pos)) and torch.equal(y, labels.gather(1, pos))
        assert pos[0].tolist() == [2 * rank, 2 * rank + 1, 14 - 2 * rank, 15 - 2 * rank]
        seen += pos[0].tolist()
    assert sorted(seen) == list(range(16))


def test_shard_sequence_rejects_indivisible_length():
    with pytest.raises(ValueError, match="divisible by 2 x context_parallel_degree"):
        shard_sequence(torch.zeros(1, 10, dtype=torch.long), torch.zeros(1, 10, dtype=torch.long), 3, 0)


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("kernel", ["masked", "chunked"])
def test_kernels_match_full_causal_attention(cp: int, kernel: str):
    torch.manual_seed(0)
    b, h, s, d = 2, 3, 32, 8
    q, k, v = (torch.randn(b, h, s, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    shards = [shard_sequence(torch.zeros(b, s), torch.zeros(b, s), cp, r)[2] for r in range(cp)]
    # What the all-gather hands every rank: each rank's K/V and positions, in rank order.
    k_all = torch.cat([k.gather(2, p[:, None, :, None].expand(b, h, -1, d)) for p in shards], dim=2)
    v_all = torch.cat([v.gather(2, p[:, None, :, None].expand(b, h, -1, d)) for p in shards], dim=2)
    pos_all = torch.cat(shards, dim=1)
    outs = []
    for rank, pos in enumerate(shards):
        q_loc = q.gather(2, pos[:, None, :, None].expand(b, h, -1, d))
        if kernel == "masked":
            out = masked_attention(q_loc, k_all, v_all, pos, pos_all)
        else:
            out = chunked_attention(q_loc, _global_order(k_all, cp, 2), _global_order(v_all, cp, 2), cp, rank)
        torch.testing.assert_close(out, ref.gather(2, pos[:, None, :, None].expand(b, h, -1, d)))
        outs.append(out)
    grads = torch.autograd.grad(sum(o.sum() for o in outs), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_chunk_ids_pair_first_and_last():
    assert [chunk_ids(4, r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]


def _simulate(q, k, v, cp: int, kernel: str) -> list[torch.Tensor]:
    """Each simulated rank's output from what the K/V exchange would hand it."""
    b, h, s, d = q.shape
    shards = [shard_sequence(torch.zeros(b, s), torch.zeros(b, s), cp, r)[2].to(q.device) for r in range(cp)]
    pick = lambda t, p: t.gather(2, p[:, None, :, None].expand(b, h, -1, d))  # noqa: E731
    k_all, v_all = torch.cat([pick(k, p) for p in shards], 2), torch.cat([pick(v, p) for p in shards], 2)
    pos_all = torch.cat(shards, dim=1)
    outs = []
    for rank, pos in enumerate(shards):
        if kernel == "masked":
            outs.append(masked_attention(pick(q, pos), k_all, v_all, pos, pos_all))
        else:
            outs.append(chunked_attention(pick(q, pos), _global_order(k_all, cp, 2), _global_order(v_all, cp, 2),
                                          cp, rank))
    return outs, shards, pick


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient"])
@pytest.mark.parametrize("kernel", ["masked", "chunked"])
def test_kernels_on_cuda_backends(backend: str, kernel: str):
    from torch.nn.attention import sdpa_kernel

    from torchtitan.models.common.attention import SDPA_BACKENDS

    if kernel == "masked" and backend == "flash":
        pytest.skip("flash attention takes no mask")
    torch.manual_seed(0)
    b, h, s, d, cp = 2, 4, 1024, 128, 4
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with sdpa_kernel([SDPA_BACKENDS[backend]]):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
        outs, shards, pick = _simulate(q, k, v, cp, kernel)
        grads = torch.autograd.grad(sum(o.float().square().sum() for o in outs), (q, k, v))
    for out, pos in zip(outs, shards):
        torch.testing.assert_close(out, pick(ref, pos), atol=2e-2, rtol=2e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=5e-2, rtol=5e-2)
