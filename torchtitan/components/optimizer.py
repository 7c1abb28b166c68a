"""Optimizers for one or more model parts (pipeline stages), checkpointable through DCP.

State dicts go through `torch.distributed.checkpoint.state_dict`, which keys the
state by parameter FQN and keeps DTensor shards, so DCP can reshard on load.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from torchtitan.config.job_config import Optimizer as OptimizerConfig

_OPTIMIZERS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}


def _kernel_kwargs(implementation: str, device_type: str) -> dict:
    """fused needs a device with fused Adam kernels (CUDA, and CPU in recent torch)."""
    if implementation == "fused":
        return {"fused": True, "foreach": False}
    if implementation == "foreach":
        return {"fused": False, "foreach": True}
    if implementation == "for-loop":
        return {"fused": False, "foreach": False}
    # auto: fused on CUDA is the fastest; on CPU foreach avoids a per-parameter loop.
    return {"fused": True, "foreach": False} if device_type == "cuda" else {"fused": False, "foreach": True}


class OptimizersContainer(Stateful):
    """One optimizer per model part, stepped together and saved under one key."""

    def __init__(self, model_parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]):
        self.model_parts = model_parts
        self.optimizers = optimizers

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def state_dict(self) -> dict:
        fn = functools.partial(get_optimizer_state_dict, options=StateDictOptions(flatten_optimizer_state_dict=True))
        out: dict = {}
        for model, opt in zip(self.model_parts, self.optimizers):
            out.update(fn(model, opt))
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        for model, opt in zip(self.model_parts, self.optimizers):
            set_optimizer_state_dict(model, opt, optim_state_dict=state_dict,
                                     options=StateDictOptions(flatten_optimizer_state_dict=True))


def build_optimizers(model_parts: list[nn.Module], cfg: OptimizerConfig, device_type: str) -> OptimizersContainer:
    cls = _OPTIMIZERS[cfg.name]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    kwargs.update(_kernel_kwargs(cfg.implementation, device_type))
    optimizers = [cls([p for p in m.parameters() if p.requires_grad], **kwargs) for m in model_parts]
    return OptimizersContainer(model_parts, optimizers)
