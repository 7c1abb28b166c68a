"""ReplicaDataloader (fault tolerance): each step's samples follow the global order for the groups present; the
position moves only on commit; a group that receives the position (healing) continues it. No torchft needed."""
from __future__ import annotations

import torch
from torch.utils.data import IterableDataset

from torchtitan.components.dataloader import ReplicaDataloader


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
