"""The training dataloader leaves the global RNG alone: a resumed run's RNG state equals an uninterrupted one's."""
from __future__ import annotations

import torch

from torchtitan.components.dataloader import ParallelAwareDataloader


class _Numbers(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([{"input": torch.tensor([i]), "label": torch.tensor([i + 1])} for i in range(8)])


def test_building_the_iterator_draws_nothing_from_the_global_rng():
    loader = ParallelAwareDataloader(_Numbers(), batch_size=2, dp_degree=1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    batches = iter(loader)
    next(batches)
    assert torch.equal(torch.get_rng_state(), before)
