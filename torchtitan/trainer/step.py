"""One optimizer step: micro-batches through forward/backward (or the pipeline schedule), clip, guard, update.

The loss of each micro-batch is summed over its tokens and multiplied by the
step's normalizer: the dp x cp size that gradient reduction averages over,
divided by the number of labelled tokens in the whole global batch (all dp/cp
ranks, all micro-batches). Every layout and any gradient accumulation then
optimize the same objective. The normalizer is an argument of the loss, also in
the pipeline schedule.

No host sync happens here: a non-finite gradient norm (NonFiniteGuard) or, when
enabled, a loss or gradient-norm spike (SpikeGuard) is caught on the device and
turns the optimizer update into a no-op (trainer/guards.py); the trainer asks the
guards on log and checkpoint steps, where it syncs anyway.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor.parallel import loss_parallel

from torchtitan.components.loss import FusedOutputLoss, logprob_sums
from torchtitan.components.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.components.qk_clip import QKClip
from torchtitan.datasets import IGNORE_INDEX
from torchtitan.distributed.context_parallel import shard_sequence
from torchtitan.distributed.expert_parallel import reduce_partial_grads
from torchtitan.distributed.fault_tolerance import SingleGroup
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.pipeline import Pipeline
from torchtitan.distributed.utils import all_reduce_sum, clip_grad_norm_
from torchtitan.trainer.balance import ExpertBalance
from torchtitan.trainer.documents import document_ids, document_positions
from torchtitan.trainer.guards import NonFiniteGuard, SpikeGuard


class StepOutput(NamedTuple):
    loss_sum: torch.Tensor  # this rank's summed token loss (zero on ranks without the last pipeline stage)
    n_tokens: torch.Tensor  # labelled tokens in the global batch
    grad_norm: torch.Tensor  # global gradient norm, before clipping
    committed: bool = True  # fault tolerance: False when a replica group failed mid-step (nothing was updated)


def global_mean_loss(out: StepOutput, dims: ParallelDims) -> float:
    """The step's loss per labelled token over the global batch (a host sync: call on log steps)."""
    loss = all_reduce_sum(out.loss_sum.detach().float(), dims.group("dp_cp"))
    loss = all_reduce_sum(loss, dims.group("pp"))  # only the last stage has a loss
    return (loss / out.n_tokens).item()


@dataclass
class ModelRunner:
    """How this rank computes one micro-batch's loss and gradients: its model parts, or the pipeline over them."""

    parts: list[nn.Module]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device: torch.device
    pipeline: Pipeline | None = None
    cp_mesh: DeviceMesh | None = None  # context parallel: each rank keeps its share of the sequence
    loss_parallel: bool = False  # tensor parallel: the loss runs on vocab-sharded logits
    autocast: torch.dtype | None = None  # mixed precision where FSDP does not provide it (trainer/plan.py)
    document_eos_id: int | None = None  # document masking: attention stays inside EOS-delimited documents
    document_rope_restart: bool = False  # ... and RoPE positions restart in every document

    def _prepare(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """This rank's inputs and labels on the device, and the model's keyword inputs (positions, documents)."""
        inputs, labels = inputs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        kwargs: dict = {}
        rope = None
        if self.document_eos_id is not None:
            # Document ids of the whole window, on every cp rank: the attention core slices what it needs.
            kwargs["documents"] = document_ids(inputs, self.document_eos_id)
            if self.document_rope_restart:
                rope = document_positions(kwargs["documents"])
        if self.cp_mesh is not None:
            inputs, labels, positions = shard_sequence(inputs, labels, self.cp_mesh.size(),
                                                       self.cp_mesh.get_local_rank())
            rope = positions if rope is None else rope.gather(1, positions)
        if rope is not None:
            kwargs["positions"] = rope
        return inputs, labels, kwargs

    def _context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if self.loss_parallel:
            stack.enter_context(loss_parallel())
        if self.autocast is not None:
            stack.enter_context(torch.autocast(self.device.type, self.autocast))
        return stack

    def _loss(self, inputs: torch.Tensor, labels: torch.Tensor, kwargs: dict) -> torch.Tensor:
        (model,) = self.parts
        return self.loss_fn(model(inputs, **kwargs), labels)

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor,
                         scale: torch.Tensor) -> torch.Tensor | None:
        """Accumulate the gradients of scale x summed loss; return the summed loss (None: no last stage here)."""
        inputs, labels, kwargs = self._prepare(inputs, labels)
        with self._context():
            if self.pipeline is not None:
                return self.pipeline.step(inputs, labels, scale, kwargs)
            loss = self._loss(inputs, labels, kwargs)
            (loss * scale).backward()
        return loss.detach()

    @torch.no_grad()
    def forward_eval(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """The summed loss of a batch, forward only (None: no last stage here)."""
        inputs, labels, kwargs = self._prepare(inputs, labels)
        with self._context():
            if self.pipeline is not None:
                return self.pipeline.eval(inputs, labels, kwargs)
            return self._loss(inputs, labels, kwargs)

    @torch.no_grad()
    def forward_scores(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Downstream evaluation: (B, K) summed log-probabilities of each row's K target columns (targets
        (B, S, K), IGNORE_INDEX where unlabelled), on every rank holding the last stage; None elsewhere."""
        inputs, targets, kwargs = self._prepare(inputs, targets)
        head = self.loss_fn.head if isinstance(self.loss_fn, FusedOutputLoss) else None
        score = functools.partial(logprob_sums, head=head)
        with self._context():
            if self.pipeline is not None:
                out = self.pipeline.score(inputs, targets, score, kwargs)
            else:
                (model,) = self.parts
                out = score(model(inputs, **kwargs), targets)
        if out is not None and self.cp_mesh is not None:
            out = all_reduce_sum(out, self.cp_mesh.get_group())  # each cp rank scored its share of the positions
        return out


@dataclass(frozen=True)
class StepHooks:
    """What a step consults besides the model and the optimizer, declared once by the trainer."""

    guard: NonFiniteGuard  # a non-finite gradient norm turns the update into a no-op
    groups: SingleGroup  # the replica groups: SingleGroup without fault tolerance, every hook the identity
    spike_guard: SpikeGuard | None = None  # skip the update of a loss or gradient-norm spike
    balance: ExpertBalance | None = None  # MoE routing statistics over the global batch
    after_update: Callable[[], None] | None = None  # after the optimizer (float8 scales)
    qk_clip: QKClip | None = None  # after the optimizer: scale down heads whose logits exceeded the threshold


def train_step(runner: ModelRunner, batches: list[tuple[torch.Tensor, torch.Tensor]], *, step: int,
               dims: ParallelDims, optimizers: OptimizersContainer, lr_schedulers: LRSchedulersContainer,
               max_norm: float, hooks: StepHooks) -> StepOutput:
    """One optimizer step over `batches` (the step's micro-batches of (inputs, labels), local to this dp rank).

    Under fault tolerance, synchronous mode, tokens, loss and gradients are also summed over the replica groups
    present, and the update happens only if the step commits (torchft: no cross-group collective failed).
    Semi-synchronous mode (DiLoCo): the step is this group's alone; every sync_steps steps, after the update, the
    groups sync their weights (hooks.groups.end_step)."""
    groups, balance = hooks.groups, hooks.balance
    if balance is not None:
        routing_pass = balance.routing_pass_needed(len(batches), runner.pipeline is not None)
        balance.begin_step((lambda: [runner.forward_eval(i, lb) for i, lb in batches]) if routing_pass else None)
    n_local = sum((labels != IGNORE_INDEX).sum() for _, labels in batches)
    # Labels are counted before context-parallel sharding, so cp ranks hold the same count: sum over dp only.
    # Then over the replica groups present: the normalizer is their global batch.
    n_global = groups.sum(all_reduce_sum(n_local.to(runner.device), dims.group("dp")))
    # Gradient reduction averages over dp x cp; undo that so gradients are of the global mean.
    scale = dims.dp * dims.cp / n_global.clamp(min=1).float()
    loss_sum = torch.zeros((), device=runner.device)
    for i, (inputs, labels) in enumerate(batches):
        for part in runner.parts:
            if isinstance(part, FSDPModule):
                # Reduce-scatter once per step, not once per micro-batch.
                part.set_requires_gradient_sync(i == len(batches) - 1)
        loss = runner.forward_backward(inputs, labels, scale)
        if loss is not None:
            loss_sum = loss_sum + loss
    params = [p for part in runner.parts for p in part.parameters()]
    reduce_partial_grads(params)
    groups.reduce_grads(params)
    loss_sum = groups.sum(loss_sum)  # rank r of each group: global_mean_loss then sums inside the group
    if not groups.commit():
        optimizers.zero_grad()
        return StepOutput(loss_sum, n_global, torch.zeros((), device=runner.device), committed=False)
    copies = runner.pipeline.sync_tied_grads() if runner.pipeline is not None else []
    grad_norm = clip_grad_norm_(params, max_norm, pp_group=dims.group("pp"), norm_exclude=copies)
    skip = hooks.guard.skip(step, grad_norm)
    if hooks.spike_guard is not None:
        # The global mean loss, reduced on the device (collectives, no host sync), so every rank decides alike.
        mean_loss = all_reduce_sum(all_reduce_sum(loss_sum, dims.group("dp_cp")), dims.group("pp")) / n_global
        skip = skip | hooks.spike_guard.skip(mean_loss, grad_norm)
    optimizers.step(skip=skip)
    if hooks.qk_clip is not None:
        hooks.qk_clip.apply(skip)
    if hooks.after_update is not None:
        hooks.after_update()
    if balance is not None:
        balance.end_step(skip)
    lr_schedulers.step()
    optimizers.zero_grad()
    groups.end_step(step)  # DiLoCo: the step's record; every sync_steps steps, the sync across groups
    return StepOutput(loss_sum, n_global, grad_norm)
