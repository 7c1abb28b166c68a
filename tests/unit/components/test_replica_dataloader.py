"""ReplicaDataloader (fault tolerance): each step's samples follow the global order for the groups present; the
position moves only on commit; a group that receives the position (healing) continues it. No torchft needed."""
from __future__ import annotations

import torch
from torch.utils.data import IterableDataset

from torchtitan.components.dataloader import BlockDataloader, ReplicaDataloader


class Numbered(IterableDataset):
    """Sample i holds i; Stateful after every sample, as the global streams of the real datasets."""

    def __init__(self):
        self.next = 0

    def __iter__(self):
        while True:
            i = self.next
            self.next += 1
            yield {"input": torch.tensor([i]), "label": torch.tensor([i])}

    def state_dict(self):
        return {"next": self.next}

    def load_state_dict(self, state):
        self.next = state["next"]


class Quorum:
    def __init__(self):
        self.present, self.rank, self.replica_id, self.hooks = 1, 0, 0, []

    def on_commit(self, fn):
        self.hooks.append(fn)

    def commit(self, step):
        return [fn(step, self.present, self.rank) for fn in self.hooks]


def _loader(quorum, dp_rank=0, dp_degree=1, accumulation=1):
    return ReplicaDataloader(Numbered(), local_batch_size=2, dp_rank=dp_rank, dp_degree=dp_degree,
                             accumulation=accumulation, replicas=quorum)


def _step(it, accumulation=1):
    return [next(it)[0]["input"].view(-1).tolist() for _ in range(accumulation)]


def test_samples_follow_the_quorum_and_move_only_on_commit():
    q = Quorum()
    loader = _loader(q, dp_rank=1, dp_degree=2, accumulation=2)  # 8 samples per group per step
    it = iter(loader)
    q.present, q.rank = 2, 1
    assert _step(it, 2) == [[10, 11], [14, 15]]  # group block 8..15, micro-batches of 4, dp rank 1's pair
    # The step failed (a group died): redone alone at the same position.
    q.present, q.rank = 1, 0
    assert _step(it, 2) == [[2, 3], [6, 7]]
    assert q.commit(1) == [{"samples": [2, 3, 6, 7]}]
    assert loader.position == 8
    q.present, q.rank = 2, 0
    assert _step(it, 2) == [[10, 11], [14, 15]]
    q.commit(2)
    assert loader.position == 24

    # A group joining now receives this state (healing) and continues at the same place.
    joined = _loader(Quorum(), dp_rank=1, dp_degree=2, accumulation=2)
    joined.load_state_dict(loader.state_dict())
    joined.replicas.present, joined.replicas.rank = 2, 1
    assert _step(iter(joined), 2) == [[34, 35], [38, 39]]  # block 32..39 of the step at 24


class SyncQuorum(Quorum):
    def on_sync(self, block, settle):
        self.block, self.settle = block, settle


def _block_loader(quorum, sync_steps=2):
    return BlockDataloader(Numbered(), sync_steps=sync_steps, local_batch_size=2, dp_rank=0, dp_degree=1,
                           accumulation=1, replicas=quorum)


def test_diloco_blocks_lost_with_a_group_are_trained_again():
    """Blocks of 2 steps x 2 samples: group r of R takes the r-th open block; a block whose group was not in the
    sync goes back to the queue, and is handed out first."""
    a, b = SyncQuorum(), SyncQuorum()
    la, lb = _block_loader(a), _block_loader(b)
    a.present = b.present = 2
    b.rank = 1
    ia, ib = iter(la), iter(lb)
    assert [_step(ia), _step(ia)] == [[[0, 1]], [[2, 3]]]  # block 0
    assert _step(ib) == [[4, 5]]  # block 1; group b dies before its second step
    assert a.block() == 0
    assert a.settle(True, [a.block()]) == {"blocks": [0], "pending": [1]}  # the sync had group a only
    a.present = 1
    assert [_step(ia), _step(ia)] == [[[4, 5]], [[6, 7]]]  # block 1 again, now by group a
    a.settle(True, [1])
    assert (la.pending, la.next_block, la.position) == ([], 2, 8)

    # A sync that does not commit queues every block of its interval; a group healed from this state (b) has
    # trained nothing of its own and takes part with the next assignment.
    a.present = 2
    assert _step(ia) == [[8, 9]]  # block 2
    lb.load_state_dict(la.state_dict())
    assert b.block() == -1
    a.settle(False, [])
    assert (la.pending, la.next_block) == ([2, 3], 4)
    b.present, b.rank = 2, 1
    lb.load_state_dict(la.state_dict())
    assert _step(iter(lb)) == [[12, 13]]  # block 3, queued
