"""The trainer's side of mixture-of-experts layers: balance losses over the global batch, expert bias, metrics.

The load-balancing loss of a layer is E x sum_e f_e P_e (Switch Transformer), f_e the share of the step's
expert assignments that went to expert e, P_e the mean router probability of expert e over the step's
tokens. Both are statistics of the whole global batch: every data, context, tensor and expert rank (their
tokens are all routed separately) and every micro-batch. P_e is a sum over tokens, so each rank adds its
tokens' share divided by the global token count; f_e needs every count first. With one micro-batch per rank
the layer all-reduces its counts in forward; with more (gradient accumulation, pipeline micro-batches) a
forward-only routing pass over the step's micro-batches fixes them before the first backward. The objective
is then the same on every layout. The z-loss is a plain mean over the step's tokens.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from torchtitan.config.job_config import MoETraining
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.pipeline import Pipeline
from torchtitan.distributed.utils import all_reduce_sum
from torchtitan.models.common.moe import MoE


class ExpertBalance:
    """Configures a model's MoE layers for training and does the per-step work around them."""

    def __init__(self, parts: list[nn.Module], cfg: MoETraining, dims: ParallelDims, global_tokens: int,
                 device: torch.device, pipeline: Pipeline | None = None):
        # A pipeline stage may hold no MoE layer; it still joins the metrics' pipeline reductions.
        self.layers = [m for part in parts for m in part.modules() if isinstance(m, MoE)]
        self.cfg, self.dims, self.device = cfg, dims, device
        self.group = dims.group("dp_cp_tp")
        for layer in self.layers:
            st = layer.balance
            st.load_balance_weight, st.z_loss_weight = cfg.load_balance_loss_weight, cfg.router_z_loss_weight
            st.n_tokens = float(global_tokens)
            # Gradients are averaged over data x context ranks (FSDP); the losses are already global means.
            st.grad_scale = float(dims.dp * dims.cp)
            st.group = self.group
        if pipeline is not None:
            # Count only the schedule's micro-batch forwards, not torch's shape-inference runs.
            for layer in self.layers:
                layer.balance.counting = False
            pipeline.microbatch_context = self.counting

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        for layer in self.layers:
            layer.balance.counting = True
        try:
            yield
        finally:
            for layer in self.layers:
                layer.balance.counting = False

    def routing_pass_needed(self, micro_batches: int, pipelined: bool) -> bool:
        return (self.cfg.load_balance_scope == "global_batch" and self.cfg.load_balance_loss_weight > 0
                and (micro_batches > 1 or pipelined))

    def begin_step(self, count_routing: Callable[[], None] | None) -> None:
        """Reset the step's statistics; with `count_routing` (a forward-only pass over the step's
        micro-batches), fix every layer's global expert counts first."""
        for layer in self.layers:
            layer.balance.reset()
        if count_routing is None:
            return
        for layer in self.layers:
            layer.balance.recording = True
        try:
            count_routing()
        finally:
            for layer in self.layers:
                layer.balance.recording = False
        for layer in self.layers:
            st = layer.balance
            st.fixed_counts = all_reduce_sum(st.counts, self.group)
            st.counts = None

    @torch.no_grad()
    def end_step(self, skip: torch.Tensor) -> None:
        """After the optimizer step: move each expert bias toward balance (aux-loss-free balancing), unless
        the guards skipped the step (`skip`, a device bool)."""
        rate = self.cfg.expert_bias_update_rate
        for layer in self.layers:
            bias = layer.router.expert_bias
            if bias is None or rate == 0 or layer.balance.counts is None:
                continue
            counts = all_reduce_sum(layer.balance.counts.clone(), self.group)
            bias.add_(torch.where(skip, 0.0, rate * torch.sign(counts.mean() - counts)))

    def metrics(self) -> dict[str, float]:
        """Summed over layers: the step's load-balancing and z losses (unweighted), and the worst layer's expert
        load imbalance (max / mean tokens per expert). Collectives: call on log steps, on every rank."""
        stats = torch.zeros(3, device=self.device, dtype=torch.float32)
        for layer in self.layers:
            st = layer.balance
            if st.load_balance_sum is not None:
                stats[0] += st.load_balance_sum.float()
            if st.z_loss_sum is not None:
                stats[1] += st.z_loss_sum.float()
            if st.counts is not None:
                counts = all_reduce_sum(st.counts.clone(), self.group)
                stats[2] = torch.maximum(stats[2], counts.max() / counts.mean().clamp(min=1e-9))
        stats[:2] = all_reduce_sum(stats[:2], self.group)
        pp = self.dims.group("pp")
        if pp is not None:
            stats[:2] = all_reduce_sum(stats[:2], pp)
            dist.all_reduce(stats[2:], op=dist.ReduceOp.MAX, group=pp)
        out = {"expert_imbalance": round(stats[2].item(), 4)}
        if self.cfg.load_balance_loss_weight > 0:
            out["load_balance_loss"] = round(stats[0].item(), 6)
        if self.cfg.router_z_loss_weight > 0:
            out["router_z_loss"] = round(stats[1].item(), 6)
        return out
