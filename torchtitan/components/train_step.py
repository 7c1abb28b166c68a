"""One optimizer step: micro-batches, forward/backward (or the pipeline schedule), clip, step.

The loss of each micro-batch is summed over its tokens and divided by the
number of labelled tokens in the whole global batch (all dp/cp ranks, all
micro-batches), times the dp x cp size that gradient reduction averages over.
Every layout and any gradient accumulation then optimize the same objective.
No host sync happens here except on log and checkpoint steps.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch.distributed.device_mesh import DeviceMesh

from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.config.job_config import JobConfig
from torchtitan.distributed import utils as dist_utils
from torchtitan.distributed.parallel_dims import ParallelDims


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainContext:
    cfg: JobConfig
    dims: ParallelDims
    mesh: DeviceMesh | None
    model_parts: list
    pp_schedule: object | None
    has_first: bool
    has_last: bool
    device: torch.device
    loss_fn: object
    optimizers: object
    lr_schedulers: object
    loss_scale: list = field(default_factory=lambda: [1.0])  # read by the pipeline loss closure
    first_bad_step: torch.Tensor | None = None

    def group(self, name: str):
        return self.mesh[name].get_group() if self.mesh is not None and self.mesh[name].size() > 1 else None

    @property
    def accumulation_steps(self) -> int:
        t = self.cfg.training
        per_micro = t.local_batch_size * self.dims.dp
        return 1 if t.global_batch_size <= 0 else t.global_batch_size // per_micro


@dataclass
class StepResult:
    ctx: TrainContext
    loss_sum: torch.Tensor
    n_tokens: torch.Tensor
    grad_norm: torch.Tensor
    global_tokens: int

    def global_loss(self) -> float:
        loss = dist_utils.all_reduce_sum(self.loss_sum.detach().float(), self.ctx.group("dp_cp"))
        loss = dist_utils.all_reduce_sum(loss, self.ctx.group("pp"))  # only the last stage has a loss
        return (loss / self.n_tokens).item()

    def check_finite(self, step: int) -> None:
        bad = self.ctx.first_bad_step
        if bad is not None and int(bad) >= 0:
            raise NonFiniteLoss(f"loss or gradient norm became nan/inf at step {int(bad)}; stopping "
                                f"(try a lower optimizer.lr, a warm-up, or check the data)")

    def log(self, step: int, metrics, lr: float) -> dict:
        loss = self.global_loss()
        self.check_finite(step)
        return metrics.log(step, loss, float(self.grad_norm), lr)


def _record_nonfinite(ctx: TrainContext, step_tensor_value: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
    bad = ~(torch.isfinite(grad_norm) & torch.isfinite(loss))
    if ctx.first_bad_step is None:
        ctx.first_bad_step = torch.full((), -1, dtype=torch.long, device=grad_norm.device)
    ctx.first_bad_step = torch.where(bad & (ctx.first_bad_step < 0), step_tensor_value, ctx.first_bad_step)


def _cp_shard(ctx: TrainContext, inputs: torch.Tensor, labels: torch.Tensor):
    """Context parallel: this rank's load-balanced share of the sequence, with global positions."""
    from torchtitan.distributed.context_parallel import shard_sequence

    cp_mesh = ctx.mesh["cp"]
    return shard_sequence(inputs, labels, cp_mesh.size(), cp_mesh.get_local_rank())


def train_step(ctx: TrainContext, data_iter, metrics) -> StepResult:
    cfg = ctx.cfg
    micro = []
    t0 = time.perf_counter()
    for _ in range(ctx.accumulation_steps):
        batch, labels = next(data_iter)
        micro.append((batch["input"], labels))
    metrics.add_data_time(time.perf_counter() - t0)

    n_local = sum((labels != IGNORE_INDEX).sum() for _, labels in micro)
    # Labels are counted before context-parallel sharding, so cp ranks hold the same count: sum over dp only.
    n_global = dist_utils.all_reduce_sum(n_local.to(ctx.device), ctx.group("dp"))
    # Gradient reduction averages over dp x cp; undo that so gradients are of the global mean.
    scale = ctx.dims.dp * ctx.dims.cp / n_global.clamp(min=1).float()
    ctx.loss_scale[0] = scale

    loss_ctx = contextlib.nullcontext
    if ctx.dims.tp_enabled and not cfg.parallelism.disable_loss_parallel:
        from torch.distributed.tensor.parallel import loss_parallel

        loss_ctx = loss_parallel

    loss_sum = torch.zeros((), device=ctx.device)
    for i, (inputs, labels) in enumerate(micro):
        inputs, labels = inputs.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
        positions = None
        if ctx.dims.cp_enabled:
            inputs, labels, positions = _cp_shard(ctx, inputs, labels)
        last_micro = i == len(micro) - 1
        for part in ctx.model_parts:
            if hasattr(part, "set_requires_gradient_sync"):
                # FSDP: reduce-scatter once per step, not once per micro-batch.
                part.set_requires_gradient_sync(last_micro)
        if ctx.pp_schedule is not None:
            losses: list[torch.Tensor] = []
            kwargs = {"positions": positions} if positions is not None else {}
            with loss_ctx():
                if ctx.has_first:
                    ctx.pp_schedule.step(inputs, **kwargs, target=labels if ctx.has_last else None,
                                         losses=losses if ctx.has_last else None)
                elif ctx.has_last:
                    ctx.pp_schedule.step(**kwargs, target=labels, losses=losses)
                else:
                    ctx.pp_schedule.step(**kwargs)
            if ctx.has_last and losses:
                # Pipeline losses are already multiplied by `scale`.
                loss_sum = loss_sum + torch.stack([l.detach() for l in losses]).sum() / scale
        else:
            model = ctx.model_parts[0]
            with loss_ctx():
                logits = model(inputs, positions) if positions is not None else model(inputs)
                loss = ctx.loss_fn(logits, labels)
                (loss * scale).backward()
            loss_sum = loss_sum + loss.detach()
            del logits, loss

    params = [p for part in ctx.model_parts for p in part.parameters()]
    grad_norm = dist_utils.clip_grad_norm_(params, cfg.training.max_norm, pp_group=ctx.group("pp"))
    ctx.optimizers.step()
    if "float8" in cfg.model.converters:
        from torchtitan.components.float8 import precompute_float8_scales

        precompute_float8_scales(ctx.model_parts, cfg.float8)
    ctx.lr_schedulers.step()
    ctx.optimizers.zero_grad()
    step_no = ctx.lr_schedulers.schedulers[0].last_epoch
    _record_nonfinite(ctx, step_no, loss_sum, grad_norm)
    global_tokens = cfg.training.local_batch_size * ctx.dims.dp * ctx.accumulation_steps * cfg.training.seq_len
    metrics.add_step(global_tokens)
    return StepResult(ctx, loss_sum, n_global, grad_norm, global_tokens)
