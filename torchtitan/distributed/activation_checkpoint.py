"""Activation checkpointing per transformer block: full, every Nth block, or per op."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from torchtitan.config.job_config import ActivationCheckpoint
from torchtitan.ops import cpu_attention  # noqa: F401  (registers torch.ops.torchtitan.cpu_causal_attention)


def _save_list() -> set:
    """Ops whose outputs are kept: matmuls and attention are the expensive ones to recompute."""
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default,
           aten._scaled_dot_product_efficient_attention.default,
           aten._scaled_dot_product_flash_attention.default,
           aten._scaled_dot_product_flash_attention_for_cpu.default,
           aten._scaled_dot_product_cudnn_attention.default,
           aten.max.default,
           torch.ops.torchtitan.cpu_causal_attention.default}  # ops/cpu_attention.py
    return ops


def _op_policy_factory():
    save = _save_list()

    def policy_fn(ctx, func, *args, **kwargs):
        mode = "recompute" if ctx.is_recompute else "forward"
        key = f"{mode}_mm_count"
        if func == torch.ops.aten.mm.default:
            counts[key] += 1
        # Recompute every second matmul: keeps memory in check while saving most of the work,
        # as torchtitan's op-level policy does.
        if func == torch.ops.aten.mm.default and counts[key] % 2 == 0:
            return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if func in save else CheckpointPolicy.PREFER_RECOMPUTE

    counts: defaultdict = defaultdict(int)

    def context_fn():
        counts.clear()
        return create_selective_checkpoint_contexts(policy_fn)

    return context_fn


def wrap_block(block: nn.Module, cfg: ActivationCheckpoint, index: int) -> nn.Module:
    if cfg.mode == "full":
        return checkpoint_wrapper(block, preserve_rng_state=False)
    if cfg.selective_ac_option == "op":
        return checkpoint_wrapper(block, context_fn=_op_policy_factory(), preserve_rng_state=False)
    every = int(cfg.selective_ac_option)
    return checkpoint_wrapper(block, preserve_rng_state=False) if index % every == 0 else block


def apply_ac(model: nn.Module, cfg: ActivationCheckpoint) -> None:
    if cfg.mode == "none":
        return
    for i, (name, block) in enumerate(list(model.layers.items())):
        model.layers[name] = wrap_block(block, cfg, i)
