"""The trainer's own progress: step, tokens seen, time, RNG; saved and restored with every checkpoint."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.stateful import Stateful


@dataclass
class TrainState(Stateful):
    step: int = 0
    tokens_seen: int = 0
    elapsed_seconds: float = 0.0

    def state_dict(self) -> dict:
        # RNG is global (every rank seeds alike and the model has no dropout), so one copy
        # follows any change of world size. DCP keeps one copy of replicated tensors.
        return {"step": torch.tensor(self.step), "tokens_seen": torch.tensor(self.tokens_seen),
                "elapsed_seconds": torch.tensor(self.elapsed_seconds), "rng_cpu": torch.get_rng_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])
        self.tokens_seen = int(sd["tokens_seen"])
        self.elapsed_seconds = float(sd["elapsed_seconds"])
        torch.set_rng_state(sd["rng_cpu"])
