"""In-loop validation: the loss per labelled token over fixed held-out sets, the same on every layout.

One set (validation.dataset: by default pydoc_heldout, the part of the bundled corpus that training on pydoc
leaves out) or several named ones (validation.sets), each logged under its name.

Every validation reads the same sequences from the start of the set (text windows packed as for training,
or memmap instances in file order), each dp rank its share of each global batch of validation.local_batch_size
x dp sequences. The loss is summed over labelled tokens and reduced over dp, cp and pp, so one process and any
mesh report the same number for the same global batch. It runs under no_grad and puts the model parts back in
train mode afterwards.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from torchtitan.components.dataloader import collate
from torchtitan.config.job_config import Data, Validation
from torchtitan.datasets import IGNORE_INDEX
from torchtitan.datasets.memmap import MemmapInstances, SequentialInstances, token_files
from torchtitan.datasets.text import DocumentSource, PackedWindows
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.utils import all_reduce_sum
from torchtitan.tools.errors import ConfigError
from torchtitan.trainer.step import ModelRunner

logger = logging.getLogger("torchtitan")


@dataclasses.dataclass
class ValidationResult:
    loss: float  # per labelled token
    perplexity: float
    tokens: int  # labelled tokens evaluated
    seconds: float
    name: str = ""  # the set's name in validation.sets ("": the one set of validation.dataset)


@dataclasses.dataclass(frozen=True)
class ValidationSet:
    name: str
    dataset: str  # a text dataset name, "local" (files at path) or "memmap"
    path: str | None


def validation_sets(cfg: Validation) -> list[ValidationSet]:
    """validation.sets parsed (NAME=DATASET, NAME=PATH, NAME=memmap:PATH), or the one set of validation.dataset."""
    if not cfg.sets:
        return [ValidationSet("", cfg.dataset, cfg.dataset_path)]
    out: list[ValidationSet] = []
    for entry in cfg.sets:
        name, sep, value = (x.strip() for x in entry.partition("="))
        if not (sep and name and value):
            raise ConfigError(f"validation.sets entry {entry!r}: write NAME=DATASET, NAME=PATH or NAME=memmap:PATH")
        if any(s.name == name for s in out):
            raise ConfigError(f"validation.sets: the name {name!r} is used twice")
        if value.startswith("memmap:"):
            out.append(ValidationSet(name, "memmap", value.removeprefix("memmap:")))
        elif os.sep in value or os.path.exists(value):
            out.append(ValidationSet(name, "local", value))
        else:
            out.append(ValidationSet(name, value, None))
    return out


class Validator:
    def __init__(self, cfg: Validation, shape: tuple[int, int], data: Data, tokenizer, dims: ParallelDims,
                 total_steps: int):
        """shape: (seq_len, local_batch_size) of a validation batch (the plan resolves their defaults)."""
        self.cfg, self.data, self.tokenizer, self.dims = cfg, data, tokenizer, dims
        self.seq_len, self.local_batch_size = shape
        self.total_steps = total_steps
        self.sets = validation_sets(cfg)

    def due(self, step: int) -> bool:
        return step % self.cfg.freq == 0 or step == self.total_steps

    def _batches(self, vset: ValidationSet) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        v, dp_rank, dp = self.cfg, self.dims.local_rank("dp"), self.dims.dp
        seq_len, batch_size = self.seq_len, self.local_batch_size
        if vset.dataset == "memmap":
            instances = MemmapInstances(token_files(vset.path), self.data.memmap_dtype, seq_len)
            dataset = SequentialInstances(instances, batch_size, dp_rank, dp)
        else:
            source = DocumentSource(vset.dataset, vset.path, self.data.dataset_text_field)
            dataset = PackedWindows(source, lambda texts: self.tokenizer.encode_batch(texts, bos=True, eos=True),
                                    seq_len, batch_size, dp_rank, dp, infinite=False)
        for i, (batch, labels) in enumerate(DataLoader(dataset, batch_size=batch_size, collate_fn=collate)):
            if i == v.steps:
                return
            yield batch["input"], labels

    def run(self, runner: ModelRunner) -> list[ValidationResult]:
        """Every set, in order."""
        return [self._run(runner, vset) for vset in self.sets]

    @torch.no_grad()
    def _run(self, runner: ModelRunner, vset: ValidationSet) -> ValidationResult:
        t0 = time.perf_counter()
        for part in runner.parts:
            part.eval()
        loss_sum = torch.zeros((), device=runner.device, dtype=torch.float64)
        n_tokens = torch.zeros((), device=runner.device, dtype=torch.long)
        try:
            for inputs, labels in self._batches(vset):
                n_tokens += (labels != IGNORE_INDEX).sum().to(runner.device)
                loss = runner.forward_eval(inputs, labels)
                if loss is not None:
                    loss_sum += loss.double()
        finally:
            for part in runner.parts:
                part.train()
        # Labels are counted before context-parallel sharding: tokens sum over dp, losses over dp, cp and pp.
        loss_sum = all_reduce_sum(all_reduce_sum(loss_sum, self.dims.group("dp_cp")), self.dims.group("pp"))
        n = int(all_reduce_sum(n_tokens, self.dims.group("dp")))
        mean = float(loss_sum) / max(n, 1)
        return ValidationResult(mean, math.exp(min(mean, 700.0)), n, time.perf_counter() - t0, vset.name)

