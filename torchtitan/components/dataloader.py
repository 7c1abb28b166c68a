"""Dataloader construction: a dataset for this dp rank served by torchdata's StatefulDataLoader, or, with fault
tolerance, this rank's share of the global sample order for the replica groups present at each step."""
from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torchdata.stateful_dataloader import StatefulDataLoader

from torchtitan.config.job_config import Training
from torchtitan.datasets.memmap import build_memmap_dataset
from torchtitan.datasets.text import DocumentSource, PackedWindows
from torchtitan.tools.errors import DataError

if TYPE_CHECKING:
    from torchtitan.distributed.fault_tolerance import ReplicaGroups


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
        blob = pickle.loads(state["state"])
        if "position" in blob:
            # Saved by a fault-tolerant run (ReplicaDataloader): the dataset's position in the global order, which
            # the dataset checks against this run's batch layout; the iterator starts from it.
            self.dataset.load_state_dict(blob["dataset"])
            return
        super().load_state_dict(blob["loader"])


def collate(items: list[dict]) -> tuple[dict, torch.Tensor]:
    return {"input": torch.stack([it["input"] for it in items])}, torch.stack([it["label"] for it in items])


class ReplicaDataloader(Stateful):
    """Fault tolerance: micro-batches cut from the global sample order for the replica groups present at each step.

    The dataset is read as one global stream (dp rank 0 of 1), sample by sample; sample i is the i-th of the
    run. A step at position p with R groups present takes samples p .. p + R*k - 1 (k = samples per group per
    step): group rank r the r-th block of k, and within it micro-batch m, dp rank d its slice. The position moves
    by R*k only when the step commits, so a step redone after a failure reads the same samples for the new
    quorum, and a group that rejoins receives the position from a live peer: no sample is skipped or seen twice.
    The global indices of the samples this rank trained on go into each step's fault-tolerance record.
    """

    def __init__(self, dataset, *, local_batch_size: int, dp_rank: int, dp_degree: int, accumulation: int,
                 replicas: ReplicaGroups):
        self.dataset, self.replicas = dataset, replicas
        self.local_batch_size, self.dp_rank, self.accumulation = local_batch_size, dp_rank, accumulation
        self.micro = local_batch_size * dp_degree
        self.per_replica = self.micro * accumulation
        self.position = 0  # global samples committed
        self._base_state = dataset.state_dict()  # the dataset's state at self.position
        self._buffer: list[tuple[dict, dict]] = []  # samples from self.position on, each with the state after it
        self._stream: Iterator[dict] | None = None
        self._used: list[int] = []  # global indices this rank read in the current attempt
        replicas.on_commit(self._commit)

    def _sample(self, index: int) -> dict:
        if self._stream is None:
            self._stream = iter(self.dataset)
        while len(self._buffer) <= index - self.position:
            sample = next(self._stream)
            self._buffer.append((sample, self.dataset.state_dict()))
        return self._buffer[index - self.position][0]

    def __iter__(self):
        while True:
            start = self.position + self.replicas.rank * self.per_replica
            self._used = []
            for m in range(self.accumulation):
                lo = start + m * self.micro + self.dp_rank * self.local_batch_size
                self._used.extend(range(lo, lo + self.local_batch_size))
                yield collate([self._sample(i) for i in range(lo, lo + self.local_batch_size)])

    def _commit(self, step: int, present: int, rank: int) -> dict:
        advance = present * self.per_replica
        self._sample(self.position + advance - 1)  # read up to the new position, so its state is known
        self._base_state = self._buffer[advance - 1][1]
        del self._buffer[:advance]
        self.position += advance
        return {"samples": self._used}

    def state_dict(self) -> dict:
        return {"state": pickle.dumps({"position": self.position, "dataset": self._base_state})}

    def load_state_dict(self, state: dict) -> None:
        blob = pickle.loads(state["state"])
        if "position" not in blob:
            raise DataError("the checkpoint's dataloader state is from a run without fault tolerance; resume it "
                             "with checkpoint.exclude_from_loading = [\"dataloader\"] or without fault tolerance")
        self.position, self._base_state = int(blob["position"]), blob["dataset"]
        self.dataset.load_state_dict(self._base_state)
        self._buffer, self._stream = [], None


def build_dataloader(cfg: Training, tokenizer, dp_rank: int, dp_degree: int, dump_folder: str,
                     infinite: bool = True, replicas: ReplicaGroups | None = None,
                     accumulation: int = 1) -> ParallelAwareDataloader | ReplicaDataloader:
    if replicas is not None:
        # The global stream, one sample at a time: its state is valid after every sample.
        stream = build_dataloader(dataclasses.replace(cfg, local_batch_size=1, global_batch_size=-1), tokenizer,
                                  0, 1, dump_folder, infinite).dataset
        return ReplicaDataloader(stream, local_batch_size=cfg.local_batch_size, dp_rank=dp_rank,
                                 dp_degree=dp_degree, accumulation=accumulation, replicas=replicas)
    if cfg.dataset == "memmap":
        dataset = build_memmap_dataset(cfg, dp_rank, dp_degree, dump_folder)
    else:
        seed = (cfg.seed or 0) if cfg.shuffle_documents else None
        source = DocumentSource(cfg.dataset, cfg.dataset_path, cfg.dataset_text_field, shuffle_seed=seed)
        dataset = PackedWindows(source, lambda texts: tokenizer.encode_batch(texts, bos=True, eos=True),
                                cfg.seq_len, cfg.local_batch_size, dp_rank, dp_degree, infinite=infinite)
    return ParallelAwareDataloader(dataset, cfg.local_batch_size, dp_degree)
