"""Context parallel attention in one process: each simulated rank's output equals its rows of full causal attention."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchtitan.distributed.context_parallel import chunk_ids, shard_sequence
from torchtitan.ops.attention import CAUSAL, attend


def masked_attention(q, k, v, q_pos, k_pos):
    """What a CP rank computes: its queries against the gathered keys, causal by global position."""
    return attend(q, k, v, CAUSAL, "default", q_pos, k_pos)


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


def _simulate(q, k, v, cp: int):
    """Each simulated rank's output from what the K/V exchange would hand it, and its positions."""
    b, h, s, d = q.shape
    shards = [shard_sequence(torch.zeros(b, s), torch.zeros(b, s), cp, r)[2].to(q.device) for r in range(cp)]
    k_all, v_all = torch.cat([_pick(k, p) for p in shards], 2), torch.cat([_pick(v, p) for p in shards], 2)
    pos_all = torch.cat(shards, dim=1)
    return [masked_attention(_pick(q, pos), k_all, v_all, pos, pos_all) for pos in shards], shards


def _pick(t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    b, h, _, d = t.shape
    return t.gather(2, pos[:, None, :, None].expand(b, h, -1, d))


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_masked_attention_matches_full_causal_attention(cp: int):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 32, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    outs, shards = _simulate(q, k, v, cp)
    for out, pos in zip(outs, shards):
        torch.testing.assert_close(out, _pick(ref, pos))
    grads = torch.autograd.grad(sum(o.square().sum() for o in outs), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_chunk_ids_pair_first_and_last():
    assert [chunk_ids(4, r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["cudnn", "efficient", "math"])
def test_masked_attention_on_cuda_backends(backend: str):
    from torch.nn.attention import sdpa_kernel

    from torchtitan.ops.attention import SDPA_BACKENDS

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with sdpa_kernel([SDPA_BACKENDS[backend]]):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        outs, shards = _simulate(q, k, v, 4)
    for out, pos in zip(outs, shards):
        torch.testing.assert_close(out, _pick(ref, pos), atol=2e-2, rtol=2e-2)
