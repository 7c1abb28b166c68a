"""Downstream evaluation (OLMo's tasks, components/downstream.py) on the model being trained or a loaded one.

The batches are planned once, the same on every rank; dp rank r runs batches r, r + dp, ... (their number
padded to a multiple of dp with empty ones, so every rank runs as many forwards: FSDP and expert-parallel
collectives pair up). tp and cp ranks of one dp rank run the same batch; the runner sums cp ranks' shares and
pipeline parallel returns scores on the last stage. Scores stay on the device until the end, then every rank
gathers all of them (one object all-gather) and computes every task's metric from the same numbers: one process
and every layout report the same values for the same scores.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from torchtitan.components.downstream import (
    ScoreBatch,
    Task,
    build_tasks,
    check_task_tokens,
    compute_metric,
    padded_length,
    plan_batches,
    resolve_tasks,
)
from torchtitan.components.tokenizer import Tokenizer
from torchtitan.config.job_config import DownstreamEval, Training
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.trainer.step import ModelRunner

logger = logging.getLogger("torchtitan")


@dataclasses.dataclass
class DownstreamResult:
    results: dict[str, dict[str, float]]  # task label -> ICLMetric.compute() keys
    metric_types: dict[str, str]
    documents: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """How evaluation batches are cut: padded tokens per forward, rows at most (0: any), length alignment, the
    longest sequence; fixed = (rows, length) when every batch must have one shape (pipeline parallel)."""

    batch_tokens: int
    max_rows: int
    align: int
    max_len: int
    fixed: tuple[int, int] | None = None


class DownstreamEvaluator:
    def __init__(self, tasks: Sequence[Task], shape: BatchShape, pad_id: int, *, dp_rank: int = 0, dp: int = 1,
                 freq: int = 0, total_steps: int = 0, fatal: bool = True):
        """freq, total_steps: when `due` (in the loop); fatal: whether `try_run` lets a failure through."""
        self.tasks, self.shape, self.pad_id = list(tasks), shape, pad_id
        self.dp_rank, self.dp = dp_rank, dp
        self.freq, self.total_steps, self.fatal = freq, total_steps, fatal
        s = shape
        rows = s.fixed[0] if s.fixed else s.max_rows
        tokens = s.fixed[0] * s.fixed[1] if s.fixed else s.batch_tokens
        self.batches = plan_batches(self.tasks, batch_tokens=tokens, max_rows=rows, align=s.align, max_len=s.max_len)
        self.documents = sum(t.documents for t in self.tasks)
        n = -(-len(self.batches) // dp) * dp  # every dp rank runs as many forwards
        self.mine = list(range(dp_rank, n, dp))

    def _tensors(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.shape
        if i >= len(self.batches):  # padding batch: nothing to score
            rows, length = s.fixed or (1, min(s.align, s.max_len))
            return ScoreBatch([], []).tensors(length, self.pad_id, rows)
        b = self.batches[i]
        if s.fixed:
            return b.tensors(s.fixed[1], self.pad_id, s.fixed[0])
        return b.tensors(padded_length(len(b.rows[0]), s.align, s.max_len), self.pad_id)

    def due(self, step: int) -> bool:
        return step % self.freq == 0 or step == self.total_steps

    def try_run(self, runner: ModelRunner, step: int) -> DownstreamResult | None:
        """run(), but a failure is logged and training goes on (None) unless the evaluation is fatal. Every rank
        computes the metrics from the same gathered scores, so a failure there is the same on all ranks."""
        try:
            return self.run(runner)
        except Exception as e:  # noqa: BLE001
            if self.fatal:
                raise
            logger.error(f"downstream evaluation at step {step} failed, training goes on "
                         f"(downstream_eval.fatal = true stops instead): {type(e).__name__}: {e}")
            return None

    @torch.no_grad()
    def run(self, runner: ModelRunner) -> DownstreamResult:
        t0 = time.perf_counter()
        for part in runner.parts:
            part.eval()
        outputs: list[torch.Tensor] = []
        try:
            for i in self.mine:
                inputs, targets = self._tensors(i)
                scores = runner.forward_scores(inputs, targets)
                if scores is not None:
                    outputs.append(scores.flatten())
        finally:
            for part in runner.parts:
                part.train()
        # one device-to-host copy for the whole evaluation
        flat = torch.cat(outputs).cpu().tolist() if outputs else []
        mine = (self.mine, flat) if outputs else ([], [])
        gathered = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
        scores = self._scores(gathered)
        results = {t.label: compute_metric(t, scores) for t in self.tasks}
        return DownstreamResult(results, {t.label: t.metric_type for t in self.tasks}, self.documents,
                                time.perf_counter() - t0)

    def _scores(self, gathered) -> dict:
        """(query, continuation) -> log-likelihood from every rank's (batch indices, flat scores)."""
        scores: dict = {}
        for indices, flat in gathered:
            pos = 0
            for i in indices:
                rows, width = self._score_shape(i)
                if i < len(self.batches):
                    b = self.batches[i]
                    for r, (query, conts) in enumerate(zip(b.rows, b.continuations)):
                        for k, cont in enumerate(conts):
                            scores.setdefault((query, cont), flat[pos + r * width + k])
                pos += rows * width
        return scores

    def _score_shape(self, i: int) -> tuple[int, int]:
        """(rows, K) of batch i's score tensor, as _tensors builds it."""
        s = self.shape
        if i >= len(self.batches):
            return (s.fixed[0] if s.fixed else 1), 1
        b = self.batches[i]
        rows = s.fixed[0] if s.fixed else len(b.rows)
        return rows, max(len(c) for c in b.continuations)


def batch_shape(cfg: DownstreamEval, training: Training, dims: ParallelDims) -> BatchShape:
    """Lengths aligned to 64 tokens and to what sequence and context parallel shard (tp x 2 cp); under pipeline
    parallel every batch has training's shape."""
    seq = training.seq_len
    align = math.lcm(64, dims.tp * (2 * dims.cp if dims.cp > 1 else 1))
    tokens = cfg.batch_tokens if cfg.batch_tokens > 0 else training.local_batch_size * seq
    fixed = (training.local_batch_size, seq) if dims.pp > 1 else None
    return BatchShape(tokens, cfg.local_batch_size, align, seq, fixed)


def build_downstream_evaluator(cfg: DownstreamEval, training: Training, tokenizer: Tokenizer, dims: ParallelDims,
                               vocab_size: int) -> DownstreamEvaluator:
    """cfg: the [downstream_eval] section; the tasks are tokenized once, here."""
    t0 = time.perf_counter()
    labels = resolve_tasks(cfg.tasks, "downstream_eval.tasks")
    tasks = build_tasks(labels, tokenizer, cfg.model_ctx_len if cfg.model_ctx_len > 0 else training.seq_len,
                        cfg.limit)
    check_task_tokens(tasks, vocab_size, f"downstream_eval.tasks with tokenizer {getattr(tokenizer, 'path', '')}")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    ev = DownstreamEvaluator(tasks, batch_shape(cfg, training, dims), pad, dp_rank=dims.local_rank("dp"), dp=dims.dp,
                             freq=cfg.freq, total_steps=training.steps, fatal=cfg.fatal)
    logger.info(f"downstream evaluation: {len(tasks)} tasks, {ev.documents:,} documents, {len(ev.batches)} batches "
                f"(prepared in {time.perf_counter() - t0:.1f}s)")
    return ev
