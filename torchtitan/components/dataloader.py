"""Dataloader construction: a dataset for this dp rank served by torchdata's StatefulDataLoader."""
from __future__ import annotations

import pickle

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torchdata.stateful_dataloader import StatefulDataLoader

from torchtitan.config.job_config import Training
from torchtitan.datasets.memmap import build_memmap_dataset
from torchtitan.datasets.text import DocumentSource, PackedWindows


class ParallelAwareDataloader(StatefulDataLoader, Stateful):
    """StatefulDataLoader whose state is rank-independent (see datasets/text.py), saved as one entry."""

    def __init__(self, dataset, batch_size: int, dp_degree: int):
        super().__init__(dataset, batch_size=batch_size, num_workers=0, collate_fn=collate)
        self.dp_degree = dp_degree

    def state_dict(self) -> dict:
        # One pickled blob: the state is the same on every rank, so DCP stores it once
        # and any data-parallel size can read it back.
        return {"state": pickle.dumps({"loader": super().state_dict(), "dp_degree": self.dp_degree})}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(pickle.loads(state["state"])["loader"])


def collate(items: list[dict]) -> tuple[dict, torch.Tensor]:
    return {"input": torch.stack([it["input"] for it in items])}, torch.stack([it["label"] for it in items])


def build_dataloader(cfg: Training, tokenizer, dp_rank: int, dp_degree: int, dump_folder: str,
                     infinite: bool = True) -> ParallelAwareDataloader:
    if cfg.dataset == "memmap":
        dataset = build_memmap_dataset(cfg, dp_rank, dp_degree, dump_folder)
    else:
        seed = (cfg.seed or 0) if cfg.shuffle_documents else None
        source = DocumentSource(cfg.dataset, cfg.dataset_path, cfg.dataset_text_field, shuffle_seed=seed)
        dataset = PackedWindows(source, lambda texts: tokenizer.encode_batch(texts, bos=True, eos=True),
                                cfg.seq_len, cfg.local_batch_size, dp_rank, dp_degree, infinite=infinite)
    return ParallelAwareDataloader(dataset, cfg.local_batch_size, dp_degree)
