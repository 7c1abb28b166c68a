"""Context-parallel attention on real gloo ranks equals full attention, forward and backward.

One launch of 2 and one of 4 processes (torch.multiprocessing, gloo) run every case: both
rotate methods, grouped K/V heads, sliding windows that cross chunk boundaries, document
masking, and attention sinks (their gradient summed over the ranks). Each rank compares its
rows of the output and its share of the gradients with a single-process dense reference
computed from the same seed.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.reference import dense_attention
from torchtitan.distributed.context_parallel import ContextParallelAttention, chunk_ids, shard_sequence
from torchtitan.ops.masks import CAUSAL, AttentionMask

CASES = [  # (rotate method, window, documents, attention sinks)
    ("alltoall", None, False, False), ("allgather", None, False, False),
    ("alltoall", 5, False, False), ("alltoall", 24, False, False), ("allgather", 11, False, False),
    ("alltoall", None, True, False), ("allgather", None, True, False), ("alltoall", 9, True, False),
    ("alltoall", 5, False, True), ("allgather", None, True, True),
]


def _local(t: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """This rank's share of a (B, H, S, D) tensor along S, as shard_sequence lays it out."""
    s = t.shape[2]
    idx = shard_sequence(torch.zeros(1, s), torch.zeros(1, s), cp, rank)[2][0]
    return t.index_select(2, idx)


def _worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = dist.group.WORLD
        for method, window, docs, sinks in CASES:
            torch.manual_seed(0)
            q = torch.randn(2, 4, 48, 8, dtype=torch.float64, requires_grad=True)
            k, v = (torch.randn(2, 2, 48, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
            sink = (torch.randn(4, dtype=torch.float64) * 2).requires_grad_() if sinks else None
            documents = None
            if docs:  # documents of 7, 20, 21 tokens / one of 48: boundaries inside chunks and on them
                documents = torch.stack([torch.tensor([0] * 7 + [1] * 20 + [2] * 21),
                                         torch.zeros(48, dtype=torch.long)])
            g = torch.randn(2, 4, 48, 8, dtype=torch.float64)
            ref = dense_attention(q, k, v, window, documents, sink)
            ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v, *([sink] if sinks else [])))
            mask = CAUSAL if window is None else AttentionMask("sliding_window", window)
            core = ContextParallelAttention(group, method, mask)
            lq, lk, lv = (_local(t, world, rank).detach().requires_grad_() for t in (q, k, v))
            ls = sink.detach().requires_grad_() if sinks else None
            # The model hands the core heads-transposed views of (B, S, H, D) tensors: strided, not contiguous.
            out = core(*(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (lq, lk, lv)), documents, sinks=ls)
            grads = torch.autograd.grad((out * _local(g, world, rank)).sum(), (lq, lk, lv, *([ls] if sinks else [])))
            case = f"cp{world} {method} window={window} documents={docs} sinks={sinks}"
            if sinks:  # each rank's share of the sinks' gradient is over its queries: their sum is the whole
                dsink = grads[-1].clone()
                dist.all_reduce(dsink, group=group)
                torch.testing.assert_close(dsink, ref_grads[-1], msg=f"{case} dsinks differs")
                grads, ref_grads = grads[:-1], ref_grads[:-1]
            for what, got, want in zip(("output", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
                torch.testing.assert_close(got, _local(want, world, rank), msg=f"{case} {what} differs")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_attention_equals_dense(world: int):
    # A failed comparison raises in its rank; start_processes re-raises it here with the rank's traceback.
    mp.start_processes(_worker, args=(world, _free_port()), nprocs=world, start_method="spawn", join=True)


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


def test_chunk_ids_pair_first_and_last():
    assert [chunk_ids(4, r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
