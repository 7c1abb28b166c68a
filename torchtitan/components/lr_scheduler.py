"""Warm-up, optional stable phase, then linear/sqrt/cosine decay to min_lr_factor (WSD-style)."""
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


class LRSchedulersContainer(Stateful):
    """One LambdaLR per optimizer; they move in lockstep, so one state is saved."""

    def __init__(self, optimizers, cfg: LRConfig, total_steps: int):
        def fn(last_epoch: int) -> float:
            # LambdaLR calls with 0 at construction: that sets the lr of optimizer step 1.
            return lr_factor(last_epoch + 1, warmup_steps=cfg.warmup_steps, total_steps=total_steps,
                             decay_ratio=cfg.decay_ratio, decay_type=cfg.decay_type, min_lr_factor=cfg.min_lr_factor)

        self.schedulers = [LambdaLR(opt, fn) for opt in optimizers.optimizers]

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def get_last_lr(self) -> float:
        return self.schedulers[0].get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"last_epoch": self.schedulers[0].last_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        for s in self.schedulers:
            s.last_epoch = int(state_dict["last_epoch"])
            s._last_lr = [s.lr_lambdas[0](s.last_epoch) * base for base in s.base_lrs]
            for group, lr in zip(s.optimizer.param_groups, s._last_lr):
                group["lr"] = lr


def build_lr_schedulers(optimizers, cfg: LRConfig, total_steps: int) -> LRSchedulersContainer:
    return LRSchedulersContainer(optimizers, cfg, total_steps)
