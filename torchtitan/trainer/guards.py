"""Guards that decide on the device, without a host sync, whether a step's update is applied.

NonFiniteGuard (always on) stops a run at the first step whose gradient norm is not finite; SpikeGuard
(training.spike_guard_sigma > 0, OLMo-core's skip-step idea) skips single steps whose loss or gradient norm
jumps far above its recent history and lets training go on. Both see global values (the gradient norm over
every shard and stage, the loss reduced over every rank), so every rank makes the same decision, and the
fused optimizer reads the decision on the device (components/optimizer.py).
"""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.stateful import Stateful

from torchtitan.tools.errors import CheckpointError, TrainingDiverged


class NonFiniteGuard:
    """Stops training at the first step whose gradient norm is not finite, before that step's update.

    From the first bad step on, every update is skipped (the weights stay those before it) until `check()`,
    called where the trainer syncs anyway, raises with the step number. A non-finite loss always makes the
    gradients non-finite too.
    """

    def __init__(self) -> None:
        self.first_bad_step: torch.Tensor | None = None

    def skip(self, step: int, grad_norm: torch.Tensor) -> torch.Tensor:
        """0-dim bool on the device: whether this step's update must not be applied."""
        if self.first_bad_step is None:
            self.first_bad_step = torch.full((), -1, dtype=torch.long, device=grad_norm.device)
        bad = ~torch.isfinite(grad_norm)
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), step, self.first_bad_step)
        return self.first_bad_step >= 0

    def check(self) -> None:
        if self.first_bad_step is not None and int(self.first_bad_step) >= 0:
            raise TrainingDiverged(f"loss or gradient norm became nan/inf at step {int(self.first_bad_step)}; "
                                   f"stopping before that step's update (try a lower optimizer.lr, a warm-up, "
                                   f"or check the data)")


class SpikeGuard(Stateful):
    """Skips the update of a step whose loss or gradient norm exceeds the mean of the last `window` applied
    steps by more than `sigma` standard deviations.

    It starts judging once half the window is filled. A skipped step's values stay out of the window, so a
    spike does not raise the bar for the next one. The window, its position and the count of skipped steps
    are checkpointed (top-level key "spike_guard"), so a resumed run skips exactly the steps an
    uninterrupted one would.
    """

    def __init__(self, sigma: float, window: int, device: torch.device):
        self.sigma, self.window = sigma, window
        self.values = torch.zeros(window, 2, dtype=torch.float64, device=device)  # (loss, grad norm) per step
        self.filled = torch.zeros((), dtype=torch.long, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.skipped = torch.zeros((), dtype=torch.long, device=device)

    def skip(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """0-dim bool on the device: whether this step is a spike. Records the step if it is not."""
        now = torch.stack([loss.double(), grad_norm.double()])
        valid = (torch.arange(self.window, device=self.values.device) < self.filled).unsqueeze(1)
        n = self.filled.clamp(min=1).double()
        mean = (self.values * valid).sum(0) / n
        std = (((self.values - mean) * valid).square().sum(0) / n).sqrt()
        judged = self.filled >= max(2, self.window // 2)
        spike = judged & (now > mean + self.sigma * std).any() | ~torch.isfinite(now).all()
        keep = ~spike
        row = torch.where(keep, now, self.values[self.position])
        self.values.index_copy_(0, self.position.view(1), row.view(1, 2))
        self.position = (self.position + keep.long()) % self.window
        self.filled = (self.filled + keep.long()).clamp(max=self.window)
        self.skipped = self.skipped + spike.long()
        return spike

    def state_dict(self) -> dict:
        return {"values": self.values, "filled": self.filled, "position": self.position, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        if state["values"].shape != self.values.shape:
            raise CheckpointError(f"the checkpoint's spike guard window holds {state['values'].shape[0]} steps but "
                                  f"training.spike_guard_window is {self.window}; keep the window when resuming")
        self.values.copy_(state["values"])
        self.filled, self.position = state["filled"].clone(), state["position"].clone()
        self.skipped = state["skipped"].clone()
