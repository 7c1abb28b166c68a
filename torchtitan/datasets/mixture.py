"""Source mixtures of memmap data: named sources at target ratios, each capped at a maximum repetition.

A run trains on `budget` instances (training.steps x global batch). Source i contributes k_i of them, the
ratios times the budget rounded by largest remainder so the k_i sum to the budget exactly. Its k_i instances
are whole permutations of its own (kept) instances, as many as k_i // n_i, then the first k_i % n_i of one more:
every instance is seen floor or ceil of k_i / n_i times, never more than max_repetition allows. The sources'
picks are then shuffled together into one global order. Every random draw comes from numpy's PCG64 seeded by
(seed, epoch, source position), so the order is a function of (seed, sources, budget) only: the same on every
layout and number of GPUs, written once by rank 0 as global_indices.npy (memmap.py's DataOrder).

Instance ids of the mixture run over the sources in config order (source i's instances are
[offset_i, offset_i + n_i)), each source's over its files as in MemmapInstances.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from torchtitan.datasets.memmap import MemmapInstances
from torchtitan.tools.errors import DataError

logger = logging.getLogger(__name__)


def expand_paths(key: str, patterns: list[str]) -> list[str]:
    """Globs expanded in name order (a plain path is kept as is, so a missing file is named by the reader)."""
    out = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise DataError(f"{key}: {pattern} matches no file")
            out.extend(matches)
        else:
            out.append(pattern)
    return out


@dataclass(frozen=True)
class SourceShare:
    """What one source gives the run: `wanted` of its `kept` instances (kept: after the instance filter)."""

    name: str
    instances: MemmapInstances
    target_ratio: float
    max_repetition: float
    kept: np.ndarray  # source-local instance ids that pass the filter, ascending
    wanted: int

    @property
    def repetition(self) -> float:
        return self.wanted / max(len(self.kept), 1)


def check_ratios(sources) -> None:
    """The [[data.sources]] tables themselves: names, ratios, caps (before any file is read)."""
    names = [s.name for s in sources]
    for i, s in enumerate(sources):
        where = f"data.sources[{i}]" + (f" ({s.name})" if s.name else "")
        if not s.name or "/" in s.name or s.name.strip() != s.name:
            raise DataError(f"{where}: name must be a non-empty word without '/' (it names the data/<name>/* "
                            f"metrics), got {s.name!r}")
        if names.count(s.name) > 1:
            raise DataError(f"data.sources: the name {s.name!r} is used twice; every source needs its own name")
        if not s.paths:
            raise DataError(f"{where}: paths is empty: list its token files (globs allowed)")
        if not 0 < s.target_ratio <= 1:
            raise DataError(f"{where}: target_ratio must be in (0, 1], got {s.target_ratio}")
        if not s.max_repetition > 0:
            raise DataError(f"{where}: max_repetition must be > 0, got {s.max_repetition}")
        if s.max_repetition == float("inf") and s.name != "data":
            raise DataError(f"{where}: max_repetition must be a finite number of passes, got inf")
    total = sum(s.target_ratio for s in sources)
    if abs(total - 1.0) > 1e-6:
        listed = ", ".join(f"{s.name} {s.target_ratio:g}" for s in sources)
        raise DataError(f"data.sources: the target_ratio values sum to {total:.6g}, not 1 ({listed})")


def allocate(ratios: list[float], budget: int) -> list[int]:
    """Instances per source: ratio x budget, rounded by largest remainder so they sum to the budget."""
    exact = [r * budget for r in ratios]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:budget - sum(counts)]:
        counts[i] += 1
    return counts


def plan_sources(sources, *, dtype: str, seq_len: int, budget: int, keep=None) -> list[SourceShare]:
    """Open every source's files, apply `keep(instances) -> kept ids` (the instance filter) and check that each
    source holds its share within its cap. Errors name the source, the tokens it needs and the tokens it has."""
    check_ratios(sources)
    wanted = allocate([s.target_ratio for s in sources], budget)
    shares = []
    for i, (s, k) in enumerate(zip(sources, wanted)):
        where = f"data.sources[{i}] ({s.name})"
        paths = expand_paths(f"{where}.paths", list(s.paths))
        masks = expand_paths(f"{where}.label_mask_paths", list(s.label_mask_paths)) or None
        if masks and len(masks) != len(paths):
            raise DataError(f"{where}: {len(masks)} label_mask_paths for {len(paths)} token files: give one mask "
                            f"file per token file")
        instances = MemmapInstances(paths, dtype, seq_len, masks)
        kept = keep(instances) if keep is not None else np.arange(len(instances), dtype=np.int64)
        if not len(kept):
            cap = 0
        elif math.isinf(s.max_repetition):
            cap = k
        else:
            cap = math.floor(s.max_repetition * len(kept) + 1e-9)
        if k > cap:
            dropped = len(instances) - len(kept)
            after = f" ({dropped:,} left out by data.instance_filter)" if dropped else ""
            raise DataError(
                f"{where} needs {k * seq_len:,} tokens ({k:,} instances of {seq_len}: target_ratio "
                f"{s.target_ratio:g} of {budget:,} instances = training.steps x global batch) but has "
                f"{len(kept) * seq_len:,}{after}, which max_repetition {s.max_repetition:g} allows to give "
                f"{cap * seq_len:,}; add data, raise max_repetition to {k / max(len(kept), 1):.3g}, or lower its "
                f"target_ratio")
        shares.append(SourceShare(s.name, instances, s.target_ratio, s.max_repetition, kept, k))
    return shares


def _rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, position])))


def mixture_order(shares: list[SourceShare], seed: int, epoch: int) -> np.ndarray:
    """The global order of an epoch (uint32 mixture instance ids): see the module doc."""
    offsets = np.cumsum([0] + [len(s.instances) for s in shares])
    if offsets[-1] >= np.iinfo(np.uint32).max:
        raise DataError(f"{offsets[-1]} instances do not fit the uint32 data order")
    picks = []
    for i, s in enumerate(shares):
        rng = _rng(seed, epoch, i + 1)
        rounds, rest = divmod(s.wanted, len(s.kept))
        for r in range(rounds + (1 if rest else 0)):
            perm = rng.permutation(s.kept)
            picks.append(offsets[i] + (perm if r < rounds else perm[:rest]))
    order = np.concatenate(picks).astype(np.uint32) if picks else np.zeros(0, np.uint32)
    _rng(seed, epoch, 0).shuffle(order)
    return order


class MixtureInstances:
    """Random access to the instances of several sources (MemmapInstances each) under one id space."""

    def __init__(self, shares: list[SourceShare]):
        self.shares = shares
        self.names = [s.name for s in shares]
        self.seq_len = shares[0].instances.seq_len
        self.dtype = shares[0].instances.dtype
        self._offsets = np.cumsum([0] + [len(s.instances) for s in shares]).astype(np.int64)
        self.files = [f for s in shares for f in s.instances.files]

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def source_of(self, ids: np.ndarray) -> np.ndarray:
        """Source position of each mixture instance id."""
        return np.searchsorted(self._offsets, np.asarray(ids, dtype=np.int64), side="right") - 1

    def _local(self, index: int) -> tuple[SourceShare, int]:
        i = int(self.source_of(np.array([index]))[0])
        return self.shares[i], index - int(self._offsets[i])

    def item(self, index: int) -> dict[str, torch.Tensor]:
        share, local = self._local(index)
        return share.instances.item(local)

    def tokens(self, index: int) -> np.ndarray:
        share, local = self._local(index)
        return share.instances.tokens(local)

    def label_mask(self, index: int) -> np.ndarray | None:
        share, local = self._local(index)
        return share.instances.label_mask(local)

    def labelled_tokens(self, ids: np.ndarray) -> np.ndarray:
        """Labelled tokens per source in these instances: seq_len - 1 each, less the masked labels."""
        out = np.zeros(len(self.shares), dtype=np.int64)
        src = self.source_of(ids)
        np.add.at(out, src, self.seq_len - 1)
        for index, i in zip(ids, src):
            if self.shares[i].instances.files[0].mask_path is not None:
                mask = self.label_mask(int(index))
                out[i] -= int((~mask[1:]).sum())
        return out

    def describe(self) -> list[dict]:
        """The sources as the order depends on them (data_order.json, the fingerprint)."""
        return [{"name": s.name, "target_ratio": s.target_ratio, "max_repetition": s.max_repetition,
                 "instances": len(s.instances), "kept": len(s.kept), "wanted": s.wanted,
                 "files": [[f.path, f.num_tokens] for f in s.instances.files]}
                for s in self.shares]

    def fingerprint_info(self) -> dict:
        sources = [{k: v for k, v in d.items() if k != "kept"} for d in self.describe()]
        return {"sources": sources, "dtype": self.dtype, "seq_len": self.seq_len}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint_info(), sort_keys=True).encode()).hexdigest()[:16]

    def log_plan(self) -> None:
        for s in self.shares:
            dropped = len(s.instances) - len(s.kept)
            logger.info("data source %s: %d instances (%d files)%s, target_ratio %g -> %d instances, each seen "
                        "%.3gx (max_repetition %g)", s.name, len(s.instances), len(s.instances.files),
                        f", {dropped} left out by the instance filter" if dropped else "", s.target_ratio, s.wanted,
                        s.repetition, s.max_repetition)


def check_sources(sources, *, dtype: str, seq_len: int, budget: int) -> None:
    """Preflight (file sizes only, no data read): names and ratios, every file present, and every source large
    enough for its share within its cap (the instance filter, which reads the data, may still leave one short)."""
    check_ratios(sources)
    for i, s in enumerate(sources):
        for key, paths in (("paths", s.paths), ("label_mask_paths", s.label_mask_paths)):
            for path in paths:
                if not glob.has_magic(path) and not os.path.isfile(path):
                    raise DataError(f"data.sources[{i}] ({s.name}).{key}: {path}: no such file")
    plan_sources(sources, dtype=dtype, seq_len=seq_len, budget=budget)


def filtered_ids(instances: MemmapInstances, drop_mask, block: int = 4096) -> np.ndarray:
    """Ids of the instances `drop_mask(tokens (n, seq_len)) -> bool (n,)` keeps, read file by file in blocks."""
    kept = []
    for f in instances.files:
        if f.num_instances == 0:
            continue
        tokens = np.memmap(f.path, dtype=instances.np_dtype, mode="r")[:f.num_instances * instances.seq_len]
        tokens = tokens.reshape(f.num_instances, instances.seq_len)
        for lo in range(0, f.num_instances, block):
            drop = drop_mask(np.asarray(tokens[lo:lo + block]))
            kept.append(f.first_instance + lo + np.flatnonzero(~drop))
    return np.concatenate(kept).astype(np.int64) if kept else np.zeros(0, np.int64)


def mixture_sources(data) -> list:
    """[[data.sources]], or the flat data.memmap_paths as one source "data" that may repeat without limit
    (the flat list's epochs), so the instance filter applies to it too."""
    if data.sources:
        return list(data.sources)
    from torchtitan.config.job_config import Source

    return [Source(name="data", paths=list(data.memmap_paths), label_mask_paths=list(data.memmap_label_mask_paths),
                   target_ratio=1.0, max_repetition=float("inf"))]


def mixture_plan(data, *, seq_len: int, seed: int, budget: int, apply_filter: bool = True):
    """(instances, data_order.json meta, build(epoch)) of a mixture. The filter reads every instance; only the
    rank that writes the order needs its result (apply_filter=False elsewhere)."""
    from torchtitan.datasets.filters import RepetitionFilter

    repetition = (RepetitionFilter(data.instance_filter_max_period, data.instance_filter_min_period,
                                   data.instance_filter_max_count) if data.instance_filter else None)
    keep = (lambda inst: filtered_ids(inst, repetition.drop_mask)) if repetition and apply_filter else None
    shares = plan_sources(mixture_sources(data), dtype=data.memmap_dtype, seq_len=seq_len, budget=budget, keep=keep)
    mix = MixtureInstances(shares)
    meta = {"format": "raw uint32 instance ids of a source mixture, one file per epoch", "num_instances": budget,
            "seed": seed, "seq_len": seq_len, "dtype": data.memmap_dtype, "budget": budget,
            "instance_filter": dataclasses.asdict(repetition) if repetition else None,
            "sources": [{k: v for k, v in d.items() if k != "kept"} for d in mix.describe()]}
    return mix, meta, lambda epoch: mixture_order(shares, seed, epoch)


def build_mixture_dataset(data, *, seq_len: int, local_batch_size: int, global_batch_size: int, seed: int,
                          dp_rank: int, dp_degree: int, dump_folder: str, budget: int):
    """The mixture's MemmapDataset. Rank 0 applies the instance filter and writes the order; the other ranks read
    it (they never need the filter's result)."""
    from torchtitan.datasets.memmap import DataOrder, MemmapDataset, _is_writer

    mix, meta, build = mixture_plan(data, seq_len=seq_len, seed=seed, budget=budget, apply_filter=_is_writer())
    if _is_writer():
        mix.log_plan()
    order = DataOrder(dump_folder, meta, build=build)
    order.prepare(ignore_mismatch=data.data_order_ignore_fingerprint)
    return MemmapDataset(mix, order, local_batch_size, dp_rank, dp_degree, global_batch_size,
                         ignore_fingerprint=data.data_order_ignore_fingerprint)
