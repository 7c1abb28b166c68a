"""Pipeline parallel: cut the meta-device model into stages, parallelize each, run a torch schedule.

Why it is built this way:
- The model is cut by pruning deep copies (drop the layers, embedding or head a
  stage does not own; the model's forward and init_weights accept None), so
  parameter FQNs stay global and DCP checkpoints move between any layouts.
- Each stage is parallelized on its own (TP -> AC -> compile -> FSDP), exactly as
  a whole model would be; pipelining composes with the other degrees by calling
  the given parallelize function once per stage.
- The loss is a sum over tokens times the step's global normalizer (see
  trainer/step.py), passed to every micro-batch's loss as an argument, and the
  schedule is told not to rescale gradients (scale_grads=False), so gradients
  equal those of the same step without PP.
- Everything that can be wrong in the config is checked by trainer/checks.py, which also runs
  `plan_stages` (it refuses stage splits that cannot run), before any process group exists.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import _Action, _PipelineScheduleRuntime, get_schedule_class
from torch.distributed.tensor import DTensor

from torchtitan.config.job_config import Parallelism
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.tools.errors import ConfigError

logger = logging.getLogger("torchtitan")

# One stage per rank.
SINGLE_STAGE_SCHEDULES = ("GPipe", "1F1B")
# Several stages per rank, placed round-robin: stage s on rank s % pp.
LOOPED_SCHEDULES = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble")
# Exactly two stages per rank in a V: rank r holds stages r and 2*pp-1-r, so the
# last stage sits next to the first and the loss's backward starts without a hop.
V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")
# Schedules that split backward into input and weight parts; torch refuses compiled stages for them.
NO_COMPILE_SCHEDULES = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
CSV_SCHEDULE = "CSV"
RUNNABLE_SCHEDULES = SINGLE_STAGE_SCHEDULES + LOOPED_SCHEDULES + V_SCHEDULES + (CSV_SCHEDULE,)

# Module attributes that only the first / last stage keeps.
FIRST_STAGE_MODULES = ("tok_embeddings",)
LAST_STAGE_MODULES = ("norm", "output")


@dataclass(frozen=True)
class StagePlan:
    """Which layers each stage owns and which stages each pipeline rank runs."""

    layers: list[list[str]]  # layer keys per stage, in order
    stage_ranks: list[int]  # pipeline rank that runs each stage

    @property
    def num_stages(self) -> int:
        return len(self.layers)

    def stages_of(self, pp_rank: int) -> list[int]:
        return [s for s, r in enumerate(self.stage_ranks) if r == pp_rank]


# ------------------------------------------------------------------ planning (no process group)
def even_layer_counts(n_layers: int, num_stages: int) -> list[int]:
    """Split n_layers over stages as evenly as possible.

    The first and last stage also carry the embedding and the output projection,
    so the stages in the middle take the remainder first.
    """
    base, extra = divmod(n_layers, num_stages)
    order = list(range(1, num_stages - 1)) + [0, num_stages - 1][: min(2, num_stages)]
    counts = [base] * num_stages
    for s in order[:extra]:
        counts[s] += 1
    return counts


def _layers_from_split_points(points: list[str], n_layers: int) -> list[list[str]]:
    cuts = []
    for point in points:
        name, _, idx = point.partition(".")
        if name != "layers" or not idx.isdigit() or not 0 < int(idx) < n_layers:
            raise ConfigError(f"parallelism.pipeline_parallel_split_points: {point!r} is not a layer boundary; "
                              f"write layers.K with 0 < K < {n_layers}, e.g. layers.{max(1, n_layers // 2)}")
        cuts.append(int(idx))
    if cuts != sorted(set(cuts)):
        raise ConfigError(f"parallelism.pipeline_parallel_split_points {points} must be strictly increasing")
    bounds = [0, *cuts, n_layers]
    return [[str(i) for i in range(a, b)] for a, b in zip(bounds[:-1], bounds[1:])]


def read_csv_schedule(path: str) -> list[list[str]]:
    """The compute actions of a CSV schedule, one row per pipeline rank (torch's `_load_csv` format)."""
    try:
        with open(path, newline="") as f:
            return [[cell.strip() for cell in row if cell.strip()] for row in csv.reader(f)]
    except OSError as e:
        raise ConfigError(f"parallelism.pipeline_parallel_schedule_csv {path!r}: {e.strerror}") from None


def _csv_stage_ranks(path: str, pp: int) -> list[int]:
    """Stage placement written in a CSV schedule: the rank whose row runs a stage owns it."""
    rows = read_csv_schedule(path)
    if len(rows) != pp:
        raise ConfigError(f"parallelism.pipeline_parallel_schedule_csv {path}: {len(rows)} rows but "
                          f"pipeline_parallel_degree = {pp}; write one row of actions per pipeline rank")
    owner: dict[int, int] = {}
    for rank, row in enumerate(rows):
        for cell in row:
            try:
                action = _Action.from_str(cell)
            except RuntimeError as e:
                raise ConfigError(f"parallelism.pipeline_parallel_schedule_csv {path}: {e}") from None
            if action is None or action.stage_index < 0:
                continue
            if owner.setdefault(action.stage_index, rank) != rank:
                raise ConfigError(f"parallelism.pipeline_parallel_schedule_csv {path}: stage {action.stage_index} "
                                  f"appears on ranks {owner[action.stage_index]} and {rank}; a stage lives on one rank")
    if sorted(owner) != list(range(len(owner))) or not owner:
        raise ConfigError(f"parallelism.pipeline_parallel_schedule_csv {path}: stages {sorted(owner)} must be 0..N-1")
    return [owner[s] for s in range(len(owner))]


def _placement(schedule: str, num_stages: int, pp: int) -> list[int]:
    if schedule in V_SCHEDULES:
        return [s if s < pp else 2 * pp - 1 - s for s in range(num_stages)]
    return [s % pp for s in range(num_stages)]


def plan_stages(p: Parallelism, n_layers: int) -> StagePlan:
    """Stages from split points, layers per stage, or the schedule's default (1 or 2 per rank)."""
    pp, schedule = p.pipeline_parallel_degree, p.pipeline_parallel_schedule
    if schedule not in RUNNABLE_SCHEDULES:
        raise ConfigError(f"parallelism.pipeline_parallel_schedule = {schedule!r} cannot run; "
                          f"valid: {', '.join(RUNNABLE_SCHEDULES)}")
    if schedule == CSV_SCHEDULE and not p.pipeline_parallel_schedule_csv:
        raise ConfigError("parallelism.pipeline_parallel_schedule = CSV needs "
                          "parallelism.pipeline_parallel_schedule_csv")
    csv_ranks = _csv_stage_ranks(p.pipeline_parallel_schedule_csv, pp) if schedule == CSV_SCHEDULE else None
    if p.pipeline_parallel_split_points:
        layers = _layers_from_split_points(p.pipeline_parallel_split_points, n_layers)
        how = f"pipeline_parallel_split_points ({len(layers)} stages)"
    else:
        if p.pipeline_parallel_layers_per_stage:
            lps = p.pipeline_parallel_layers_per_stage
            if lps <= 0 or n_layers % lps:
                raise ConfigError(f"parallelism.pipeline_parallel_layers_per_stage = {lps} must divide the model's "
                                  f"{n_layers} layers")
            num_stages = n_layers // lps
            how = f"pipeline_parallel_layers_per_stage = {lps} ({num_stages} stages)"
        else:
            num_stages = len(csv_ranks) if csv_ranks else pp * (1 if schedule in SINGLE_STAGE_SCHEDULES else 2)
            how = f"schedule {schedule} ({num_stages} stages)"
        if num_stages > n_layers:
            raise ConfigError(f"{how}: more stages than the model's {n_layers} layers; lower pipeline_parallel_degree")
        counts = even_layer_counts(n_layers, num_stages)
        starts = [sum(counts[:s]) for s in range(num_stages)]
        layers = [[str(i) for i in range(a, a + c)] for a, c in zip(starts, counts)]
    num_stages = len(layers)
    if schedule in SINGLE_STAGE_SCHEDULES and num_stages != pp:
        raise ConfigError(f"{how}: schedule {schedule} runs one stage per rank, so it needs exactly "
                          f"pipeline_parallel_degree = {pp} stages; use Interleaved1F1B for several per rank")
    if schedule in V_SCHEDULES and num_stages != 2 * pp:
        raise ConfigError(f"{how}: schedule {schedule} needs exactly 2 stages per rank = {2 * pp} stages")
    if schedule in LOOPED_SCHEDULES and num_stages % pp:
        raise ConfigError(f"{how}: schedule {schedule} needs a multiple of pipeline_parallel_degree = {pp} stages")
    if csv_ranks is not None and len(csv_ranks) != num_stages:
        raise ConfigError(f"{how}: the CSV schedule {p.pipeline_parallel_schedule_csv} runs {len(csv_ranks)} stages")
    ranks = csv_ranks if csv_ranks is not None else _placement(schedule, num_stages, pp)
    return StagePlan(layers=layers, stage_ranks=ranks)


def warmup_sends_to_self() -> bool:
    """torch < 2.12 warms up every stage's links with a send/recv to both neighbours, its own rank included
    (NCCL allows that, gloo does not); later releases warm up with a vote that keeps local neighbours local."""
    from torch.distributed.pipelining.schedules import _PipelineSchedule

    return not hasattr(_PipelineSchedule, "_warmup_p2p")


# ------------------------------------------------------------------ building
def prune_to_stage(model: nn.Module, layers: list[str], is_first: bool, is_last: bool) -> nn.Module:
    """A deep copy of the (meta-device) model keeping only what one stage owns.

    Modules the stage drops are never copied (the deepcopy memo maps them to None): copying
    all 126 layers of 405B to keep 8, once per stage, was most of a dry run's time.
    """
    keep = set(layers)
    dropped = [block for name, block in model.layers.items() if name not in keep]
    dropped += [getattr(model, n, None) for n in (() if is_first else FIRST_STAGE_MODULES)]
    dropped += [getattr(model, n, None) for n in (() if is_last else LAST_STAGE_MODULES)]
    part = copy.deepcopy(model, memo={id(m): None for m in dropped if m is not None})
    for name in [n for n in part.layers.keys() if n not in keep]:
        del part.layers[name]
    return part


def build_stage_modules(model: nn.Module, plan: StagePlan, pp_rank: int,
                        parallelize: Callable[[nn.Module], nn.Module]) -> list[tuple[int, nn.Module]]:
    """(stage index, parallelized stage module) for every stage `pp_rank` runs."""
    out = []
    for s in plan.stages_of(pp_rank):
        part = prune_to_stage(model, plan.layers[s], s == 0, s == plan.num_stages - 1)
        out.append((s, parallelize(part)))
    return out


@dataclass
class PipelineLoss:
    """The loss the schedule calls per micro-batch: summed loss times the step's global normalizer.

    The normalizer arrives as `scale`, through the schedule's `loss_kwargs` (torch >= 2.12). Older
    schedules call the loss with (pred, labels) only; there the runner sets `scale` on this object
    before each schedule step, and nothing else writes it.
    """

    loss_fn: Callable
    scale: torch.Tensor | float = 1.0

    def __call__(self, pred: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.loss_fn(pred, labels)
        if isinstance(loss, DTensor):
            # Loss parallel (TP) returns a replicated DTensor; the trainer sums and all-reduces
            # plain tensors over the pipeline group, which a DTensor cannot join.
            loss = loss.full_tensor()
        return loss * (self.scale if scale is None else scale)


def build_schedule(stages: list, p: Parallelism, local_batch_size: int, loss: Callable):
    """The configured torch schedule over this rank's stages; it must not rescale gradients (see module doc)."""
    n_mb = local_batch_size // p.pipeline_parallel_microbatch_size
    if p.pipeline_parallel_schedule == CSV_SCHEDULE:
        schedule = _PipelineScheduleRuntime(stages, n_microbatches=n_mb, loss_fn=loss, scale_grads=False)
        schedule._load_csv(p.pipeline_parallel_schedule_csv)
        return schedule
    cls = get_schedule_class(p.pipeline_parallel_schedule)
    if p.pipeline_parallel_schedule in SINGLE_STAGE_SCHEDULES:
        (stage,) = stages
        return cls(stage, n_microbatches=n_mb, loss_fn=loss, scale_grads=False)
    return cls(stages, n_microbatches=n_mb, loss_fn=loss, scale_grads=False)


@dataclass
class Pipeline:
    """This rank's stages and the schedule that runs them."""

    schedule: object
    parts: list[nn.Module]
    has_first: bool
    has_last: bool
    loss: PipelineLoss
    stages: list = field(default_factory=list)
    # Entered around every micro-batch forward the schedule runs (PipelineStage.forward_one_chunk), and
    # around nothing else: torch also runs stage forwards to infer shapes (on meta tensors, or on real ones
    # whenever the schedule switches between eval and training), which statistics must not count.
    microbatch_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    # A model that ties its output to its embedding holds two copies here: the embedding on the first stage, the
    # output on the last. (group, global rank of the first stage's holder, of the last stage's) to keep them equal.
    tied: tuple | None = None
    _loss_kwargs: bool = field(init=False)

    def __post_init__(self) -> None:
        self._loss_kwargs = "loss_kwargs" in inspect.signature(self.schedule.step).parameters
        for stage in self.stages:
            stage.forward_one_chunk = self._in_microbatch_context(stage.forward_one_chunk)

    def _in_microbatch_context(self, forward: Callable) -> Callable:
        def forward_one_chunk(*args, **kwargs):
            with self.microbatch_context():
                return forward(*args, **kwargs)
        return forward_one_chunk

    def _run(self, run: Callable, inputs: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | float,
             model_kwargs: dict | None) -> torch.Tensor | None:
        """One schedule call (`step` or `eval`) on a local batch; the summed scaled loss on the rank holding the
        last stage, None elsewhere."""
        losses = self._losses(run, inputs, labels, scale, model_kwargs)
        return torch.stack([loss.detach() for loss in losses]).sum() if losses else None

    def _losses(self, run: Callable, inputs: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | float,
                model_kwargs: dict | None) -> list[torch.Tensor] | None:
        """The loss function's output per micro-batch, in order, on the rank holding the last stage; None
        elsewhere. model_kwargs (positions, documents): (B, ...) tensors every stage's forward takes, split into
        micro-batches like the inputs."""
        kwargs: dict = dict(model_kwargs or {})
        if self._loss_kwargs:
            kwargs["loss_kwargs"] = {"scale": scale}
        else:
            self.loss.scale = scale
        losses: list[torch.Tensor] = []
        if self.has_first:
            run(inputs, **kwargs, target=labels if self.has_last else None, losses=losses if self.has_last else None)
        elif self.has_last:
            run(**kwargs, target=labels, losses=losses)
        else:
            run(**kwargs)
        return losses if self.has_last and losses else None

    def sync_tied_grads(self) -> list[torch.Tensor]:
        """Tied embedding and output on different stages: both copies get the sum of their gradients (the
        single-process gradient of the one weight), so equal copies take equal steps. Returns the output copies,
        which the gradient norm leaves out (the weight counts once). Collective between the two holders only."""
        if self.tied is None:
            return []
        group, first, last = self.tied
        copies = [p.tok_embeddings.weight for p in self.parts if p.tok_embeddings is not None]
        outputs = [p.output.weight for p in self.parts if p.output is not None]
        copies += outputs
        if not copies:
            return []
        grads = [_local(w.grad) for w in copies]
        if first == last:  # both stages on this rank (V schedules)
            grads[0].add_(grads[1])
            grads[1].copy_(grads[0])
            return outputs
        peer = last if dist.get_rank() == first else first
        received = torch.empty_like(grads[0])
        for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, grads[0], peer, group),
                                            dist.P2POp(dist.irecv, received, peer, group)]):
            work.wait()
        grads[0].add_(received)  # a + b on one side, b + a on the other: the same bits
        return outputs

    def step(self, inputs: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
             model_kwargs: dict | None = None) -> torch.Tensor | None:
        """Forward and backward of one local batch through the pipeline; the summed (unscaled) loss on the
        rank holding the last stage, None elsewhere."""
        loss = self._run(self.schedule.step, inputs, labels, scale, model_kwargs)
        return None if loss is None else loss / scale

    def eval(self, inputs: torch.Tensor, labels: torch.Tensor,
             model_kwargs: dict | None = None) -> torch.Tensor | None:
        """Forward only (validation): the schedule's eval; the summed loss on the last stage's rank, else None."""
        return self._run(self.schedule.eval, inputs, labels, 1.0, model_kwargs)

    def score(self, inputs: torch.Tensor, targets: torch.Tensor, score_fn: Callable,
              model_kwargs: dict | None = None) -> torch.Tensor | None:
        """Forward only, the last stage applying score_fn(pred, targets) -> (micro-batch, ...) instead of the
        loss (downstream evaluation); the rows' scores in order on the last stage's rank, else None."""
        loss_fn, self.loss.loss_fn = self.loss.loss_fn, score_fn
        try:
            out = self._losses(self.schedule.eval, inputs, targets, 1.0, model_kwargs)
        finally:
            self.loss.loss_fn = loss_fn
        return None if out is None else torch.cat(out)


def build_pipeline(model: nn.Module, *, dims: ParallelDims, parallelism: Parallelism, local_batch_size: int,
                   device: torch.device, parallelize: Callable[[nn.Module], nn.Module],
                   loss_fn: Callable) -> Pipeline:
    """Split `model` into this rank's stages, parallelize each, and schedule them.

    loss_fn: summed loss (pred, labels) -> scalar, the same as without pipelining.
    """
    pp_mesh = dims.mesh["pp"]
    pp_rank, group = pp_mesh.get_local_rank(), pp_mesh.get_group()
    plan = plan_stages(parallelism, len(model.layers))
    parts = build_stage_modules(model, plan, pp_rank, parallelize)
    stages = [PipelineStage(part, s, plan.num_stages, device, group=group) for s, part in parts]
    loss = PipelineLoss(loss_fn)
    schedule = build_schedule(stages, parallelism, local_batch_size, loss)
    for s, _ in parts:
        extra = (" + embedding" if s == 0 else "") + (" + norm/output" if s == plan.num_stages - 1 else "")
        logger.info(f"pipeline rank {pp_rank}: stage {s}/{plan.num_stages} holds layers "
                    f"{plan.layers[s][0]}..{plan.layers[s][-1]}{extra}")
    tied = None
    if model.args.tie_word_embeddings:
        tied = (group, dist.get_global_rank(group, plan.stage_ranks[0]),
                dist.get_global_rank(group, plan.stage_ranks[-1]))
    return Pipeline(schedule, [part for _, part in parts], has_first=any(s == 0 for s, _ in parts),
                    has_last=any(s == plan.num_stages - 1 for s, _ in parts), loss=loss, stages=stages, tied=tied)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
