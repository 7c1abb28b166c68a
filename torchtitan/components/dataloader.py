"""Dataloader construction: a dataset for this dp rank served by torchdata's StatefulDataLoader, or, with fault
tolerance, this rank's share of the global sample order for the replica groups present at each step."""
from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torchdata.stateful_dataloader import StatefulDataLoader

from torchtitan.config.batch import BatchPlan
from torchtitan.config.job_config import Data
from torchtitan.datasets.memmap import build_memmap_dataset
from torchtitan.datasets.mixture import build_mixture_dataset
from torchtitan.datasets.text import DocumentSource, PackedWindows
from torchtitan.distributed.fault_tolerance import SingleGroup
from torchtitan.tools.errors import DataError

if TYPE_CHECKING:
    from torchtitan.distributed.fault_tolerance import DiLoCoGroups, SyncReplicaGroups


class ParallelAwareDataloader(StatefulDataLoader, Stateful):
    """StatefulDataLoader whose state is rank-independent (see datasets/text.py), saved as one entry."""

    def __init__(self, dataset, batch_size: int, dp_degree: int):
        # Its own generator: building the iterator draws a seed, and from the global RNG that draw would make a
        # resumed run's RNG state (saved in later checkpoints) differ from an uninterrupted run's.
        super().__init__(dataset, batch_size=batch_size, num_workers=0, collate_fn=collate,
                         generator=torch.Generator().manual_seed(0))
        self.dp_degree = dp_degree

    def source_metrics(self) -> dict:
        """A source mixture's data/<name>/share and data/<name>/tokens since the last call (else nothing)."""
        take = getattr(self.dataset, "take_source_metrics", None)
        return take() if take is not None else {}

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
                 replicas: SyncReplicaGroups | DiLoCoGroups):
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

    def source_metrics(self) -> dict:
        """Per-source shares are not counted under fault tolerance (the stream is read sample by sample)."""
        return {}

    def _sample(self, index: int) -> dict:
        if self._stream is None:
            self._stream = iter(self.dataset)
        while len(self._buffer) <= index - self.position:
            sample = next(self._stream)
            self._buffer.append((sample, self.dataset.state_dict()))
        return self._buffer[index - self.position][0]

    def __iter__(self):
        while True:
            yield from self._read_step(self.position + self.replicas.rank * self.per_replica)

    def _read_step(self, start: int):
        """This dp rank's micro-batches of a step whose group block begins at global sample `start`."""
        self._used = []
        for m in range(self.accumulation):
            lo = start + m * self.micro + self.dp_rank * self.local_batch_size
            self._used.extend(range(lo, lo + self.local_batch_size))
            yield collate([self._sample(i) for i in range(lo, lo + self.local_batch_size)])

    def _commit(self, step: int, present: int, rank: int) -> dict:
        self._advance_to(self.position + present * self.per_replica)
        return {"samples": self._used}

    def _advance_to(self, position: int) -> None:
        """Samples before `position` are done: drop them, keep the dataset's state there."""
        advance = position - self.position
        if advance <= 0:
            return
        self._sample(position - 1)  # read up to the new position, so its state is known
        self._base_state = self._buffer[advance - 1][1]
        del self._buffer[:advance]
        self.position = position

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


class BlockDataloader(ReplicaDataloader):
    """Fault tolerance, semi-synchronous (DiLoCo): each replica group trains a block of the global order per sync.

    The global order is cut into blocks of H*k samples (H = fault_tolerance.sync_steps, k = samples per group per
    step); block b is samples b*H*k .. (b+1)*H*k - 1, and inner step j of an interval reads its j-th k. The
    open blocks are, in order, `pending` (blocks handed out earlier whose sync did not include them) then fresh
    ones from `next_block`; with R groups in the last sync's quorum, group rank r trains the r-th open block. At
    the next sync, the blocks of the groups whose pseudo-gradients were averaged are done (DiLoCoGroups gathers
    them before the commit); the others handed out (a group that died in the interval, or every block if the sync
    did not commit) go back to `pending` and are the first handed out next. So each sample is in exactly one
    committed sync; a block lost with a group is trained later, by another group or the same one.
    """

    def __init__(self, dataset, *, sync_steps: int, **kwargs):
        super().__init__(dataset, **kwargs)
        self.block_size = self.per_replica * sync_steps
        self.next_block = 0  # first block never handed out
        self.pending: list[int] = []
        self.assigned: list[int] | None = None  # the blocks of this interval, by quorum rank (None: not yet)
        self._mine: int | None = None  # the block this group trains in this interval
        self._inner = 0  # steps of this interval read so far
        self.replicas.on_sync(lambda: -1 if self._mine is None else self._mine, self._settle)

    def __iter__(self):
        while True:
            if self.assigned is None:
                present = self.replicas.present
                self.assigned = (self.pending + list(range(self.next_block, self.next_block + present)))[:present]
            self._mine = self.assigned[self.replicas.rank]
            start = self._mine * self.block_size + self._inner * self.per_replica
            self._inner += 1
            yield from self._read_step(start)

    def _commit(self, step: int, present: int, rank: int) -> dict:
        return {"samples": self._used, "block": self._mine}

    def _settle(self, committed: bool, blocks: list[int]) -> dict:
        assigned = self.assigned or []
        opened = set(self.pending) | set(assigned)
        self.next_block = max([self.next_block, *(b + 1 for b in assigned)])
        self.pending = sorted(opened - set(blocks))
        self.assigned, self._mine, self._inner = None, None, 0
        self._advance_to((self.pending[0] if self.pending else self.next_block) * self.block_size)
        return {"blocks": blocks, "pending": self.pending}

    def state_dict(self) -> dict:
        return {"state": pickle.dumps({"position": self.position, "dataset": self._base_state,
                                       "next_block": self.next_block, "pending": self.pending,
                                       "assigned": self.assigned, "block_size": self.block_size})}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        blob = pickle.loads(state["state"])
        if blob.get("block_size", self.block_size) != self.block_size:
            raise DataError(f"the dataloader state has blocks of {blob['block_size']} samples, this run "
                            f"{self.block_size} (fault_tolerance.sync_steps x samples per group per step): keep them "
                            "equal across replica groups and restarts")
        if "next_block" not in blob:  # saved in synchronous mode
            if self.position % self.block_size:
                raise DataError(f"data position {self.position} is not a multiple of the DiLoCo block "
                                f"({self.block_size} samples): resume with checkpoint.exclude_from_loading = "
                                "[\"dataloader\"]")
            blob.update(next_block=self.position // self.block_size, pending=[], assigned=None)
        self.next_block, self.pending, self.assigned = int(blob["next_block"]), list(blob["pending"]), blob["assigned"]
        self._mine, self._inner = None, 0  # healed: what this group trained since the last sync is not counted


def build_dataloader(data: Data, batch: BatchPlan, tokenizer, *, dp_rank: int, dump_folder: str, seed: int,
                     groups: SingleGroup, infinite: bool = True,
                     budget: int = 0) -> ParallelAwareDataloader | ReplicaDataloader:
    """This dp rank's micro-batches; under fault tolerance cut from the global order for the groups present.
    budget: the run's instances (training.steps x global batch), which a source mixture is drawn for."""
    if groups.data_order != "local":
        # The global stream, one sample at a time: its state is valid after every sample.
        one = BatchPlan(local_batch_size=1, seq_len=batch.seq_len, dp=1)
        stream = build_dataloader(data, one, tokenizer, dp_rank=0, dump_folder=dump_folder, seed=seed,
                                  groups=SingleGroup(dump_folder), infinite=infinite, budget=budget).dataset
        kwargs = dict(local_batch_size=batch.local_batch_size, dp_rank=dp_rank, dp_degree=batch.dp,
                      accumulation=batch.accumulation, replicas=groups)
        if groups.data_order == "global":
            return ReplicaDataloader(stream, **kwargs)
        return BlockDataloader(stream, sync_steps=groups.sync_steps, **kwargs)
    if data.dataset == "memmap" and (data.sources or data.instance_filter):
        dataset = build_mixture_dataset(data, seq_len=batch.seq_len, local_batch_size=batch.local_batch_size,
                                        global_batch_size=batch.group_batch_size, seed=seed, dp_rank=dp_rank,
                                        dp_degree=batch.dp, dump_folder=dump_folder, budget=budget)
    elif data.dataset == "memmap":
        dataset = build_memmap_dataset(data, seq_len=batch.seq_len, local_batch_size=batch.local_batch_size,
                                       global_batch_size=batch.group_batch_size, seed=seed, dp_rank=dp_rank,
                                       dp_degree=batch.dp, dump_folder=dump_folder)
    else:
        source = DocumentSource(data.dataset, data.dataset_path, data.dataset_text_field,
                                shuffle_seed=seed if data.shuffle_documents else None)
        dataset = PackedWindows(source, lambda texts: tokenizer.encode_batch(texts, bos=True, eos=True),
                                batch.seq_len, batch.local_batch_size, dp_rank, batch.dp, infinite=infinite)
    return ParallelAwareDataloader(dataset, batch.local_batch_size, batch.dp)
