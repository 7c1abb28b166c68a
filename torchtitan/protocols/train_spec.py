"""What a model family plugs into the trainer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class TrainSpec:
    name: str
    model_cls: type
    flavors: dict[str, Any]
    parallelize_fn: Callable
    pipelining_fn: Callable
    build_optimizers_fn: Callable
    build_lr_schedulers_fn: Callable
    build_dataloader_fn: Callable
    build_tokenizer_fn: Callable
    build_loss_fn: Callable
    state_dict_adapter: type | None = None

    def model_args(self, flavor: str):
        if flavor not in self.flavors:
            raise ValueError(f"model.flavor {flavor!r} is not a {self.name} flavor; valid: {', '.join(self.flavors)}")
        return self.flavors[flavor]


def default_components() -> dict[str, Callable]:
    """The builders every decoder-only family here shares."""
    from torchtitan.components.dataloader import build_dataloader
    from torchtitan.components.loss import build_loss_fn
    from torchtitan.components.lr_scheduler import build_lr_schedulers
    from torchtitan.components.optimizer import build_optimizers
    from torchtitan.components.tokenizer import build_tokenizer
    from torchtitan.distributed.pipeline import pipeline_llm

    return dict(
        pipelining_fn=pipeline_llm,
        build_optimizers_fn=build_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_loss_fn=build_loss_fn,
    )
