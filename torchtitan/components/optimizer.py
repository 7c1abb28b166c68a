"""Optimizers for one or more model parts (pipeline stages), checkpointable through DCP.

State dicts go through `torch.distributed.checkpoint.state_dict`, which keys the
state by parameter FQN and keeps DTensor shards, so DCP can reshard on load.

A step can be skipped on the device: torch's fused Adam/AdamW kernels take a
`found_inf` tensor (the hook GradScaler uses) and leave parameters, moments and
step counts untouched where it is set, with no host sync. The foreach and
for-loop kernels cannot, so with them a skip check costs one sync.

Weight decay follows the parameters' roles (components/param_groups.py): with optimizer.decay_embeddings or
optimizer.decay_norm_and_bias off, those parameters form a second group with weight_decay 0; with both on (the
default) each part has one group of every parameter. optimizer.name = "Muon" puts the ``matrix`` role on Muon and
the others on AdamW (components/muon.py). A resume keeps the config's weight decay per group, not
the checkpoint's (as OLMo's trainer does), so changing these options between runs does what they say.
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from torchtitan.components.muon import MUON_KEYS, Muon
from torchtitan.components.param_groups import (
    describe_groups,
    describe_muon_groups,
    excluded_roles,
    muon_groups,
    weight_decay_groups,
)
from torchtitan.config.job_config import Optimizer as OptimizerConfig

logger = logging.getLogger("torchtitan")
_KEPT_ON_LOAD = ("weight_decay", *MUON_KEYS)  # hyperparameters this run's config decides, not the checkpoint
MUON_EPS = 1e-7  # torch.optim.Muon's: the floor of the norm Newton-Schulz divides by
_OPTIMIZERS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}


def _kernel_kwargs(implementation: str, device_type: str) -> dict:
    """fused needs a device with fused Adam kernels (CUDA, and CPU in recent torch)."""
    if implementation == "fused":
        return {"fused": True, "foreach": False}
    if implementation == "foreach":
        return {"fused": False, "foreach": True}
    if implementation == "for-loop":
        return {"fused": False, "foreach": False}
    # auto: fused, the fastest on CUDA and CPU alike, and the one kernel that can skip a step on the device.
    return {"fused": True, "foreach": False}


class OptimizersContainer(Stateful):
    """One optimizer per model part, stepped together and saved under one key."""

    def __init__(self, model_parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]):
        self.model_parts = model_parts
        self.optimizers = optimizers

    def step(self, skip: torch.Tensor | None = None) -> None:
        """One update of every part; `skip` (a 0-dim bool tensor on the device) turns it into a no-op."""
        if skip is None:
            for opt in self.optimizers:
                opt.step()
            return
        if not all(opt.defaults.get("fused") for opt in self.optimizers):
            if not bool(skip):  # a host sync: only fused kernels read the flag on the device
                self.step()
            return
        found_inf = skip.to(torch.float32)
        for opt in self.optimizers:
            opt.grad_scale, opt.found_inf = None, found_inf
            try:
                opt.step()
            finally:
                del opt.grad_scale, opt.found_inf

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
            # A group takes its hyperparameters from the checkpoint's entry of its first parameter: keep the
            # weight decay this run's groups were built with (a checkpoint of another grouping would move it) and
            # this run's Muon settings (a run resumed on another device or with another Newton-Schulz dtype).
            kept = [{k: g[k] for k in _KEPT_ON_LOAD if k in g} for g in opt.param_groups]
            set_optimizer_state_dict(model, opt, optim_state_dict=state_dict,
                                     options=StateDictOptions(flatten_optimizer_state_dict=True))
            for group, values in zip(opt.param_groups, kept):
                group.update(values)


def build_optimizers(model_parts: list[nn.Module], cfg: OptimizerConfig, device_type: str) -> OptimizersContainer:
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    kwargs.update(_kernel_kwargs(cfg.implementation, device_type))
    excluded = excluded_roles(cfg.decay_embeddings, cfg.decay_norm_and_bias)
    if cfg.name == "Muon":
        defaults = _muon_defaults(cfg, device_type)
        optimizers = [Muon(muon_groups(m, cfg.weight_decay, excluded), muon_defaults=defaults, **kwargs)
                      for m in model_parts]
        logger.info(f"{describe_muon_groups(model_parts)}; Newton-Schulz in {defaults['ns_dtype']}")
    else:
        cls = _OPTIMIZERS[cfg.name]
        optimizers = [cls(weight_decay_groups(m, cfg.weight_decay, excluded), **kwargs) for m in model_parts]
    logger.info(describe_groups(optimizers, cfg.weight_decay, excluded))
    return OptimizersContainer(model_parts, optimizers)


def muon_ns_dtype(name: str, device_type: str) -> str:
    """`optimizer.muon_ns_dtype` resolved: auto is torch's bfloat16 on CUDA and float32 elsewhere, where bfloat16
    matmuls often run without hardware support (docs/optimizers.md)."""
    if name != "auto":
        return name
    return "bfloat16" if device_type == "cuda" else "float32"


def _muon_defaults(cfg: OptimizerConfig, device_type: str) -> dict:
    return {"momentum": cfg.muon_momentum, "nesterov": cfg.muon_nesterov,
            "ns_coefficients": tuple(cfg.muon_ns_coefficients), "ns_steps": cfg.muon_ns_steps,
            "ns_eps": MUON_EPS, "ns_dtype": muon_ns_dtype(cfg.muon_ns_dtype, device_type),
            "adjust_lr_fn": cfg.muon_adjust_lr}
