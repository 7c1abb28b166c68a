"""Warm-up, optional stable phase, then linear/sqrt/cosine decay to min_lr_factor (WSD-style); and the gradient-clip
threshold of each step (OLMo's grad-clip warm-up), which OLMo's scheduler owns too."""
from __future__ import annotations

import math

from torch.distributed.checkpoint.stateful import Stateful
from torch.optim.lr_scheduler import LambdaLR

from torchtitan.config.job_config import LRScheduler as LRConfig
from torchtitan.tools.errors import ConfigError


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, decay_ratio: float | None,
              decay_type: str, min_lr_factor: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (1-based: the first step uses step=1)."""
    warmup_steps = min(warmup_steps, total_steps)
    if decay_ratio is None:
        decay_steps = total_steps - warmup_steps
    else:
        decay_steps = round(total_steps * decay_ratio)
        if warmup_steps + decay_steps > total_steps:
            decay_steps = total_steps - warmup_steps
    stable_end = total_steps - decay_steps
    if step <= warmup_steps:
        # Start above zero so step 1 already moves the weights.
        return step / (warmup_steps + 1)
    if step <= stable_end or decay_steps == 0:
        return 1.0
    if warmup_steps == 0 and stable_end == 0:
        # No warm-up or stable step holds the peak (a stage-2 anneal): step 1 runs at it, the last at the end.
        progress = min((step - 1) / max(decay_steps - 1, 1), 1.0)
    else:
        progress = min((step - stable_end) / decay_steps, 1.0)
    if decay_type == "linear":
        remaining = 1.0 - progress
    elif decay_type == "sqrt":
        remaining = 1.0 - math.sqrt(progress)
    elif decay_type == "cosine":
        remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ConfigError(f"lr_scheduler.decay_type {decay_type!r} is not one of linear, sqrt, cosine")
    return min_lr_factor + (1.0 - min_lr_factor) * remaining


def grad_clip_max_norm(step: int, max_norm: float, warmup_steps: int | None, factor: float | None) -> float:
    """The clip threshold of optimizer step `step` (1-based) under OLMo's grad-clip warm-up.

    OLMo (olmo/optim.py Scheduler._get_max_grad_norm_coeff) gives max_grad_norm x grad_clip_warmup_factor for
    scheduler steps s <= grad_clip_warmup_steps, max_grad_norm after. Its trainer (olmo/train.py train_step) clips
    before it updates the param groups' max_grad_norm, so step N clips with the value of s = N - 1, and step 1
    with max_grad_norm itself (the groups' initial value): the factor applies on steps 2..warmup_steps + 1.
    max_norm <= 0 (no clipping) stays as it is."""
    if warmup_steps is None or factor is None or max_norm <= 0 or not 2 <= step <= warmup_steps + 1:
        return max_norm
    return factor * max_norm


class LRSchedulersContainer(Stateful):
    """One LambdaLR per optimizer; they move in lockstep, so one state is saved."""

    def __init__(self, optimizers, cfg: LRConfig, total_steps: int):
        def fn(last_epoch: int) -> float:
            # LambdaLR calls with 0 at construction: that sets the lr of optimizer step 1.
            return lr_factor(last_epoch + 1, warmup_steps=cfg.warmup_steps, total_steps=total_steps,
                             decay_ratio=cfg.decay_ratio, decay_type=cfg.decay_type, min_lr_factor=cfg.min_lr_factor)

        self.schedulers = [LambdaLR(opt, fn) for opt in optimizers.optimizers]
        self.peak_from_checkpoint = cfg.start_lr_from_checkpoint
        self.clip_warmup = (cfg.grad_clip_warmup_steps, cfg.grad_clip_warmup_factor)

    def max_norm(self, step: int, max_norm: float) -> float:
        """training.max_norm as the clip threshold of step `step` (a Python float: no sync, no recompile)."""
        return grad_clip_max_norm(step, max_norm, *self.clip_warmup)

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def get_last_lr(self) -> float:
        return self.schedulers[0].get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"last_epoch": self.schedulers[0].last_epoch}

    def set_peak(self, lr: float) -> None:
        """Make `lr` the schedule's peak (lr_scheduler.start_lr_from_checkpoint). It is kept as the optimizer
        groups' initial_lr, which the optimizer state saves, so a resumed run keeps it (load_state_dict)."""
        for s in self.schedulers:
            for group in s.optimizer.param_groups:
                group["initial_lr"] = lr
            s.base_lrs = [lr] * len(s.optimizer.param_groups)
        self.load_state_dict(self.state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        for s in self.schedulers:
            s.last_epoch = int(state_dict["last_epoch"])
        self.after_load()

    def after_load(self) -> None:
        """Set each group's lr for the next step. DCP loads states in key order, so the optimizer's (which
        carries the groups' lr and initial_lr from the checkpoint) lands after this one: the checkpoint manager
        calls this again once everything is in. With start_lr_from_checkpoint the peak is the loaded initial_lr."""
        for s in self.schedulers:
            if self.peak_from_checkpoint:
                s.base_lrs = [group["initial_lr"] for group in s.optimizer.param_groups]
            s._last_lr = [s.lr_lambdas[0](s.last_epoch) * base for base in s.base_lrs]
            for group, lr, base in zip(s.optimizer.param_groups, s._last_lr, s.base_lrs):
                group["lr"], group["initial_lr"] = lr, base


def build_lr_schedulers(optimizers, cfg: LRConfig, total_steps: int) -> LRSchedulersContainer:
    return LRSchedulersContainer(optimizers, cfg, total_steps)
