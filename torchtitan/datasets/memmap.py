"""Pre-tokenized memmap data in a global order that depends only on (seed, epoch, dataset size).

Files are raw, headerless token arrays (uint16 or uint32), as OLMo writes them.
Each file is cut into instances of exactly `seq_len` tokens (a file's remainder
is dropped); instance ids run over the files in config order. As in OLMo, an
instance is both the input and, shifted by one inside it, the labels: the last
position has no next token and its label is IGNORE_INDEX. Optional bool
label-mask files (one per token file, same length) mark tokens whose label is
ignored (False -> IGNORE_INDEX).

The order of an epoch is a permutation of the instance ids drawn from
numpy's PCG64(seed + epoch), OLMo's generator. Epoch 0 is written once to
{dump_folder}/global_indices.npy (later epochs to global_indices_epoch{E}.npy)
as raw uint32, OLMo's format (np.memmap(path, dtype=np.uint32) reads it), next
to data_order.json describing the dataset it belongs to.

Batches. The trainer draws global micro-batches of B = local_batch_size x dp
sequences, several per optimizer step under gradient accumulation. Micro-batch
m is order[m*B : (m+1)*B] and dp rank r takes its contiguous slice
[m*B + r*local_batch_size, ...). Micro-batches are consecutive, so optimizer
step s (1-based) consumes order[(s-1)*G : s*G] with G = training.global_batch_size
(or B when it is -1) whatever the number of ranks or accumulation steps: "global
batch N" below means those G sequences (N = s - 1). An epoch uses the first
floor(n / G) * G instances of its permutation, so every step is full.

State is global progress (epoch, instances consumed in it), the same on every
rank, so a run resumes on any number of ranks with the same global batch.
A fingerprint of the files (names as configured, sizes, dtype, seq_len) is
saved with it and checked on resume.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset

from torchtitan.datasets import IGNORE_INDEX
from torchtitan.tools.errors import DataError

logger = logging.getLogger(__name__)

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
ORDER_META = "data_order.json"


def token_dtype(requested: str, vocab_size: int, tokenizer_path: str) -> str:
    """The token-file dtype for a vocabulary: `requested` if every id fits it, "auto": the smallest that fits."""
    if requested == "auto":
        return "uint16" if vocab_size <= 2 ** 16 else "uint32"
    limit = np.iinfo(DTYPES[requested]).max + 1
    if vocab_size > limit:
        raise DataError(f"tokenizer {tokenizer_path} has ids up to {vocab_size - 1}, which do not fit {requested} "
                        f"(max {limit - 1}); use --dtype uint32")
    return requested


def indices_filename(epoch: int) -> str:
    return "global_indices.npy" if epoch == 0 else f"global_indices_epoch{epoch}.npy"


@dataclass(frozen=True)
class TokenFile:
    path: str
    num_tokens: int
    mask_path: str | None
    first_instance: int  # global id of this file's first instance
    num_instances: int


class MemmapInstances:
    """Random access to fixed-length instances over several token files (and their label masks)."""

    def __init__(self, paths: list[str], dtype: str, seq_len: int, mask_paths: list[str] | None = None):
        if not paths:
            raise DataError("data.memmap_paths is empty: list the token files to train on")
        if dtype not in DTYPES:
            raise DataError(f"data.memmap_dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if mask_paths and len(mask_paths) != len(paths):
            raise DataError(f"data.memmap_label_mask_paths has {len(mask_paths)} files but "
                             f"data.memmap_paths has {len(paths)}: give one mask file per token file")
        self.dtype, self.np_dtype, self.seq_len = dtype, DTYPES[dtype], seq_len
        itemsize = np.dtype(self.np_dtype).itemsize
        files, first = [], 0
        for i, path in enumerate(paths):
            if not os.path.isfile(path):
                raise DataError(f"data.memmap_paths: {path}: no such file")
            size = os.path.getsize(path)
            if size % itemsize:
                raise DataError(f"{path}: {size} bytes is not a whole number of {dtype} tokens; "
                                 f"is data.memmap_dtype right?")
            n_tok = size // itemsize
            mask = mask_paths[i] if mask_paths else None
            if mask is not None:
                if not os.path.isfile(mask):
                    raise DataError(f"data.memmap_label_mask_paths: {mask}: no such file")
                if os.path.getsize(mask) != n_tok:
                    raise DataError(f"label mask {mask} has {os.path.getsize(mask)} entries but {path} has "
                                     f"{n_tok} tokens: a mask file holds one bool byte per token")
            files.append(TokenFile(path, n_tok, mask, first, n_tok // seq_len))
            first += n_tok // seq_len
        self.files = files
        self._starts = np.array([f.first_instance for f in files], dtype=np.int64)
        self._maps: dict[str, np.memmap] = {}

    def __len__(self) -> int:
        return self.files[-1].first_instance + self.files[-1].num_instances

    def fingerprint_info(self) -> dict:
        return {"files": [[f.path, f.num_tokens] for f in self.files], "dtype": self.dtype, "seq_len": self.seq_len}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint_info(), sort_keys=True).encode()).hexdigest()[:16]

    def locate(self, index: int) -> tuple[TokenFile, int]:
        """(file, token offset in it) of instance `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"instance {index} is out of range: the dataset has {len(self)} instances")
        # The last file starting at or before `index`: files shorter than seq_len (no instances) share
        # their start with the next file and are never picked.
        f = self.files[int(np.searchsorted(self._starts, index, side="right")) - 1]
        return f, (index - f.first_instance) * self.seq_len

    def _map(self, path: str, dtype) -> np.memmap:
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=dtype, mode="r")
        return self._maps[path]

    def tokens(self, index: int) -> np.ndarray:
        f, off = self.locate(index)
        return np.asarray(self._map(f.path, self.np_dtype)[off:off + self.seq_len])

    def label_mask(self, index: int) -> np.ndarray | None:
        f, off = self.locate(index)
        return None if f.mask_path is None else np.asarray(self._map(f.mask_path, np.bool_)[off:off + self.seq_len])

    def item(self, index: int) -> dict[str, torch.Tensor]:
        """{"input", "label"}: labels are the inputs shifted left; the last and masked labels are ignored."""
        ids = torch.from_numpy(self.tokens(index).astype(np.int64))
        label = torch.full_like(ids, IGNORE_INDEX)
        label[:-1] = ids[1:]
        mask = self.label_mask(index)
        if mask is not None:
            label[:-1][~torch.from_numpy(mask[1:].copy())] = IGNORE_INDEX
        return {"input": ids, "label": label}


def build_global_indices(num_instances: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of an epoch: a function of (seed, epoch, dataset size) only."""
    if num_instances >= np.iinfo(np.uint32).max:
        raise DataError(f"{num_instances} instances do not fit the uint32 data order")
    indices = np.arange(num_instances, dtype=np.uint32)
    np.random.Generator(np.random.PCG64(seed + epoch)).shuffle(indices)
    return indices


def _is_writer() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class DataOrder:
    """The data order files of one run: written once by global rank 0, read (memory-mapped) by every rank.

    Other ranks wait for the files instead of joining a collective, so the order can be
    extended to a new epoch from inside the data iterator without any rank coordination.
    """

    def __init__(self, folder: str, meta: dict, wait_seconds: float = 1800.0, build=None):
        """build(epoch) -> the epoch's order (uint32, num_instances long); default: a permutation of all
        instances (build_global_indices). A mixture passes its own (mixture.py)."""
        self.folder, self.meta, self.wait_seconds = folder, meta, wait_seconds
        self.num_instances, self.seed = meta["num_instances"], meta["seed"]
        self.build = build or (lambda epoch: build_global_indices(self.num_instances, self.seed, epoch))
        self._cache: dict[int, np.ndarray] = {}

    @property
    def meta_path(self) -> str:
        return os.path.join(self.folder, ORDER_META)

    def _read_meta(self) -> dict | None:
        try:
            with open(self.meta_path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return None

    def prepare(self, ignore_mismatch: bool) -> None:
        """Check or (re)write data_order.json and the epoch-0 order."""
        if not _is_writer():
            return
        os.makedirs(self.folder, exist_ok=True)
        old = self._read_meta()
        if old == self.meta and os.path.isfile(os.path.join(self.folder, indices_filename(0))):
            return
        if old is not None and old != self.meta:
            differs = ", ".join(k for k in sorted(set(old) | set(self.meta)) if old.get(k) != self.meta.get(k))
            if not ignore_mismatch:
                raise DataError(
                    f"{self.meta_path} describes another dataset or seed (differs in: {differs}); this run's data "
                    f"order would change. Use a new job.dump_folder, or set data.data_order_ignore_fingerprint "
                    f"= true to rebuild the order for the current files")
            logger.warning("data order: %s differs in %s; rebuilding it for the current files", self.meta_path, differs)
        # Remove the description first: other ranks wait for a matching one, so they never read stale orders.
        for name in [ORDER_META] + [n for n in os.listdir(self.folder) if n.startswith("global_indices")]:
            if os.path.exists(os.path.join(self.folder, name)):
                os.remove(os.path.join(self.folder, name))
        self._write_epoch(0)
        _write_atomic(self.meta_path, json.dumps(self.meta, indent=1).encode())
        logger.info("data order: %d instances, seed %d, written to %s", self.num_instances, self.seed,
                    os.path.join(self.folder, indices_filename(0)))

    def _write_epoch(self, epoch: int) -> None:
        order = self.build(epoch)
        if len(order) != self.num_instances:  # pragma: no cover - a builder that disagrees with its meta
            raise DataError(f"data order of epoch {epoch} has {len(order)} instances, expected {self.num_instances}")
        _write_atomic(os.path.join(self.folder, indices_filename(epoch)), order.astype(np.uint32).tobytes())

    def _wait(self, ready) -> None:
        deadline = time.monotonic() + self.wait_seconds
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"data order: gave up after {self.wait_seconds:.0f}s waiting for rank 0 to write "
                                   f"{self.folder}/{ORDER_META} and global_indices*.npy (is job.dump_folder shared?)")
            time.sleep(0.2)

    def indices(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            path = os.path.join(self.folder, indices_filename(epoch))
            if _is_writer() and not os.path.isfile(path):
                self._write_epoch(epoch)
            self._wait(lambda: self._read_meta() == self.meta and os.path.isfile(path))
            order = np.memmap(path, dtype=np.uint32, mode="r")
            if len(order) != self.num_instances:
                raise DataError(f"{path} holds {len(order)} indices, expected {self.num_instances}")
            self._cache = {epoch: order}  # keep one epoch mapped
        return self._cache[epoch]


def epoch_size(num_instances: int, global_batch: int) -> int:
    """Instances used per epoch: whole global batches only."""
    return (num_instances // global_batch) * global_batch


def global_batch_instances(order: DataOrder, global_batch: int, batch: int) -> tuple[int, np.ndarray]:
    """(epoch, instance ids) of global batch `batch` (0-based; optimizer step batch + 1)."""
    per_epoch = epoch_size(order.num_instances, global_batch)
    if per_epoch == 0:
        raise DataError(f"the dataset has {order.num_instances} instances, fewer than one global batch of "
                         f"{global_batch}")
    batches_per_epoch = per_epoch // global_batch
    epoch, b = divmod(batch, batches_per_epoch)
    return epoch, np.asarray(order.indices(epoch)[b * global_batch:(b + 1) * global_batch])


class MemmapDataset(IterableDataset):
    """Yields {"input", "label"} for this dp rank's slice of each global micro-batch; Stateful."""

    def __init__(self, instances: MemmapInstances, order: DataOrder, local_batch_size: int, dp_rank: int,
                 dp_degree: int, global_batch_size: int, ignore_fingerprint: bool = False):
        self.instances, self.order = instances, order
        self.local_batch_size, self.dp_rank, self.dp_degree = local_batch_size, dp_rank, dp_degree
        self.micro = local_batch_size * dp_degree
        self.global_batch = global_batch_size if global_batch_size > 0 else self.micro
        if self.global_batch % self.micro:
            raise DataError(f"training.global_batch_size = {self.global_batch} is not a multiple of local_batch_size "
                             f"x dp = {self.micro}")
        self.per_epoch = epoch_size(order.num_instances, self.global_batch)
        if self.per_epoch == 0:
            raise DataError(f"memmap data: {order.num_instances} instances of {instances.seq_len} tokens in "
                             f"{len(instances.files)} files, fewer than one global batch of {self.global_batch}")
        self.ignore_fingerprint = ignore_fingerprint
        self.epoch, self.consumed = 0, 0
        # Mixtures: labelled tokens per source, counted over whole global micro-batches (the same on every rank).
        self.sources = getattr(instances, "names", None)
        self.source_tokens = np.zeros(len(self.sources or []), dtype=np.int64)
        self._window_tokens = np.zeros_like(self.source_tokens)

    def take_source_metrics(self) -> dict[str, float]:
        """data/<name>/share (of the labelled tokens since the last call) and data/<name>/tokens (cumulative)."""
        if not self.sources:
            return {}
        total = max(int(self._window_tokens.sum()), 1)
        out = {}
        for name, window, cumulative in zip(self.sources, self._window_tokens, self.source_tokens):
            out[f"data/{name}/share"] = float(window) / total
            out[f"data/{name}/tokens"] = int(cumulative)
        self._window_tokens[:] = 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "instances_consumed": self.consumed, "fingerprint": self.instances.fingerprint(),
                "fingerprint_info": self.instances.fingerprint_info(), "num_instances": len(self.instances),
                "seed": self.order.seed, **({"source_tokens": self.source_tokens.tolist()} if self.sources else {})}

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.instances.fingerprint():
            msg = _describe_change(state.get("fingerprint_info", {}), self.instances.fingerprint_info())
            if not self.ignore_fingerprint:
                raise DataError(f"memmap data changed since the checkpoint was written ({msg}); resuming would "
                                 f"replay or skip data. Restore the files, or set "
                                 f"data.data_order_ignore_fingerprint = true to continue on the new files")
            logger.warning("memmap data changed since the checkpoint (%s); continuing as asked "
                           "(data.data_order_ignore_fingerprint)", msg)
        if state["seed"] != self.order.seed and not self.ignore_fingerprint:
            raise DataError(f"the checkpoint's data order used seed {state['seed']} but training.seed is "
                             f"{self.order.seed}; set training.seed = {state['seed']} to continue the same order")
        consumed = int(state["instances_consumed"])
        if consumed % self.micro:
            raise DataError(f"dataloader checkpoint is at instance {consumed}, not a multiple of the global "
                             f"micro-batch {self.micro} (local_batch_size x dp): keep training.global_batch_size "
                             f"the same and a multiple of local_batch_size x dp when changing GPU count")
        self.epoch, self.consumed = int(state["epoch"]), consumed
        if self.sources and len(state.get("source_tokens", [])) == len(self.sources):
            self.source_tokens = np.asarray(state["source_tokens"], dtype=np.int64)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        lo = self.dp_rank * self.local_batch_size
        while True:
            if self.consumed + self.micro > self.per_epoch:
                self.epoch, self.consumed = self.epoch + 1, 0
                logger.info("memmap data: starting epoch %d", self.epoch)
            start = self.consumed + lo
            ids = np.asarray(self.order.indices(self.epoch)[start:start + self.local_batch_size])
            if self.sources:
                step_ids = np.asarray(self.order.indices(self.epoch)[self.consumed:self.consumed + self.micro])
                counts = self.instances.labelled_tokens(step_ids)
                self.source_tokens += counts
                self._window_tokens += counts
            # Progress is global and advanced before yielding, so any state saved after this
            # micro-batch was fetched points at the next one, on every rank alike.
            self.consumed += self.micro
            for i in ids:
                yield self.instances.item(int(i))


class SequentialInstances(IterableDataset):
    """Evaluation data: instances in file order, once, this dp rank's share of each global batch. A trailing
    partial global batch is left out, so every layout with the same global batch sees the same sequences."""

    def __init__(self, instances: MemmapInstances, local_batch_size: int, dp_rank: int, dp_degree: int):
        self.instances, self.local_batch_size, self.dp_rank = instances, local_batch_size, dp_rank
        self.group = local_batch_size * dp_degree

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        lo = self.dp_rank * self.local_batch_size
        for start in range(0, len(self.instances) // self.group * self.group, self.group):
            for i in range(start + lo, start + lo + self.local_batch_size):
                yield self.instances.item(i)


def token_files(path: str) -> list[str]:
    """A token file, or the token files of a folder in name order (*.npy / *.bin: raw, headerless)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".npy", ".bin")))
        if not files:
            raise DataError(f"{path}: no .npy or .bin token files in this folder")
        return files
    return [path]


def _describe_change(old: dict, new: dict) -> str:
    for key in ("dtype", "seq_len"):
        if old.get(key) != new.get(key):
            return f"{key} {old.get(key)} -> {new.get(key)}"
    old_files, new_files = old.get("files", []), new.get("files", [])
    if len(old_files) != len(new_files):
        return f"{len(old_files)} files -> {len(new_files)} files"
    for (op, on), (np_, nn_) in zip(old_files, new_files):
        if op != np_:
            return f"file {op} -> {np_}"
        if on != nn_:
            return f"{op}: {on} -> {nn_} tokens"
    return "fingerprint differs"


def order_meta(instances: MemmapInstances, seed: int) -> dict:
    return {"format": "raw uint32 instance ids, one file per epoch", "num_instances": len(instances), "seed": seed,
            "fingerprint": instances.fingerprint(), "seq_len": instances.seq_len, "dtype": instances.dtype}


def build_memmap_dataset(data, *, seq_len: int, local_batch_size: int, global_batch_size: int, seed: int,
                         dp_rank: int, dp_degree: int, dump_folder: str) -> MemmapDataset:
    """data: the [data] section; global_batch_size: sequences per optimizer step over all dp ranks."""
    instances = MemmapInstances(list(data.memmap_paths), data.memmap_dtype, seq_len,
                                list(data.memmap_label_mask_paths) or None)
    order = DataOrder(dump_folder, order_meta(instances, seed))
    order.prepare(ignore_mismatch=data.data_order_ignore_fingerprint)
    logger.info("memmap data: %d instances of %d tokens from %d files (fingerprint %s)", len(instances), seq_len,
                len(instances.files), instances.fingerprint())
    return MemmapDataset(instances, order, local_batch_size, dp_rank, dp_degree, global_batch_size,
                         ignore_fingerprint=data.data_order_ignore_fingerprint)
