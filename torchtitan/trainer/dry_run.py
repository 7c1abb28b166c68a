"""Scale on paper: apply the real sharding plans over a fake process group and count each rank's bytes.

`COMM_MODE=fake_backend NGPU=512 CONFIG=train_configs/llama3_405b.toml ./run_train.sh`
runs one process that stands for rank 0 of a 512-rank world (torch's "fake"
backend: collectives return at once). The model is built on the meta device and
goes through the same pipeline split and parallelize function as a real run,
so a plan that would fail at scale (a degree that does not divide the heads, a
schedule that needs more micro-batches) fails here too, in seconds, without GPUs.

Memory is read from the local shard shape of every parameter (DTensor
`to_local()`), not from FakeTensorMode allocation tracking, which overcounts
under tensor parallel (shared/TORCH_ON_CPU.md). Sharding plans are the same on
every rank of a mesh dimension, so rank 0's TP/FSDP shards stand for all ranks;
pipeline stages differ, so every pipeline rank's stages are built and counted.
Activations depend on batch, sequence, AC and compile and are not estimated.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from torchtitan.config.job_config import JobConfig
from torchtitan.distributed.data_parallel import reshard_policy
from torchtitan.distributed.parallel_dims import MESH_DIMS, ParallelDims
from torchtitan.distributed.pipeline import build_pipeline, build_stage_modules, plan_stages
from torchtitan.tools.dtypes import DTYPES

logger = logging.getLogger("torchtitan")

GIB = 1024 ** 3
ADAM_STATES = 2  # exp_avg and exp_avg_sq, each the dtype and shape of the (sharded) parameter


@dataclass
class RankMemory:
    """Bytes one rank holds for one pipeline rank's stages (every dp/tp/cp rank of it alike)."""

    pp_rank: int
    stages: list[int]
    layers: int
    params: int  # parameter elements on this rank
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    gathered_bytes: int  # FSDP: unsharded compute-dtype parameters alive at once (estimate)

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.gathered_bytes


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _unsharded_unit_bytes(module: nn.Module, fsdp_degree: int, dtype_bytes: int) -> int:
    """All-gathered size of `module`'s parameters in the FSDP compute dtype (TP shards stay sharded)."""
    return sum(_local(p).numel() for p in module.parameters()) * fsdp_degree * dtype_bytes


def count_memory(parts: list[nn.Module], dims: ParallelDims, cfg: JobConfig, pp_rank: int,
                 stages: list[int]) -> RankMemory:
    params = [p for part in parts for p in part.parameters()]
    local = [_local(p) for p in params]
    numel = sum(t.numel() for t in local)
    param_bytes = sum(t.numel() * t.element_size() for t in local)
    trainable = [t for p, t in zip(params, local) if p.requires_grad]
    grad_bytes = sum(t.numel() * t.element_size() for t in trainable)
    optimizer_bytes = ADAM_STATES * grad_bytes
    gathered = 0
    if dims.fsdp_enabled:
        fsdp = dims.dp_shard * dims.cp
        dtype_bytes = DTYPES[cfg.training.mixed_precision_param].itemsize
        if reshard_policy(cfg.parallelism.fsdp_reshard_after_forward, dims.pp_enabled):
            # Resharded after each unit's forward (apply_fsdp's units: embedding, each block,
            # norm + output): at most the current unit and the one prefetched are gathered.
            units = [m for part in parts for m in (part.tok_embeddings, *part.layers.values(), part.output)
                     if m is not None]
            sizes = sorted((_unsharded_unit_bytes(u, fsdp, dtype_bytes) for u in units), reverse=True)
            gathered = sum(sizes[:2])
        else:
            # Kept gathered from forward to backward (the pipeline default): whole stages.
            gathered = sum(_unsharded_unit_bytes(part, fsdp, dtype_bytes) for part in parts)
    layers = sum(len(part.layers) for part in parts)
    return RankMemory(pp_rank, stages, layers, numel, param_bytes, grad_bytes, optimizer_bytes, gathered)


def _build_parts(model: nn.Module, dims: ParallelDims, cfg: JobConfig,
                 parallelize: Callable[[nn.Module], nn.Module]) -> list[tuple[int, list[int], list[nn.Module]]]:
    """(pp rank, its stage indices, its parallelized modules) for every pipeline rank; `model` is on meta."""
    if not dims.pp_enabled:
        return [(0, [0], [parallelize(model)])]
    # Rank 0 goes through the trainer's own entry point (stages and schedule included), so the
    # schedule's constraints are checked; the other pipeline ranks only need their modules.
    pipeline = build_pipeline(model, dims=dims, parallelism=cfg.parallelism,
                              local_batch_size=cfg.training.local_batch_size, device=torch.device("meta"),
                              parallelize=parallelize, loss_fn=lambda pred, labels: pred.sum())
    plan = plan_stages(cfg.parallelism, len(model.layers))
    out = [(0, plan.stages_of(0), pipeline.parts)]
    for r in range(1, dims.pp):
        built = build_stage_modules(model, plan, r, parallelize)
        out.append((r, [s for s, _ in built], [m for _, m in built]))
    return out


def rank_memory_line(parts: list[nn.Module], dims: ParallelDims, cfg: JobConfig) -> str:
    """memory_estimation.enabled in a real run: this rank's parameter, gradient and optimizer bytes."""
    r = count_memory(parts, dims, cfg, pp_rank=0, stages=[])
    return (f"memory estimate for this rank: params {r.param_bytes / GIB:.2f} GiB, grads {r.grad_bytes / GIB:.2f} GiB, "
            f"AdamW {r.optimizer_bytes / GIB:.2f} GiB, FSDP gathered {r.gathered_bytes / GIB:.2f} GiB, "
            f"total {r.total_bytes / GIB:.2f} GiB (no activations)")


def format_table(rows: list[RankMemory], dims: ParallelDims, cfg: JobConfig, total_params: int) -> str:
    shape = " x ".join(f"{name} {size}" for name, size in zip(MESH_DIMS, dims.mesh.mesh.shape))
    lines = [
        f"dry run: {cfg.model.name} {cfg.model.flavor}, {total_params:,} parameters, world {dims.world_size} "
        f"(fake backend, meta device)",
        f"mesh: {shape}",
        "per-rank memory of every rank in each pipeline rank's group (parameters, gradients and AdamW state "
        "in the parameter dtype; gathered = FSDP all-gathered compute-dtype weights alive at once; no activations):",
        f"{'pp rank':>7}  {'stages':>8}  {'layers':>6}  {'params':>15}  {'param bytes':>15}  {'params GiB':>10}  "
        f"{'grads GiB':>9}  {'AdamW GiB':>9}  {'gathered GiB':>12}  {'total GiB':>9}",
    ]
    for r in rows:
        lines.append(
            f"{r.pp_rank:>7}  {','.join(map(str, r.stages)):>8}  {r.layers:>6}  {r.params:>15,}  {r.param_bytes:>15}  "
            f"{r.param_bytes / GIB:>10.2f}  {r.grad_bytes / GIB:>9.2f}  {r.optimizer_bytes / GIB:>9.2f}  "
            f"{r.gathered_bytes / GIB:>12.2f}  {r.total_bytes / GIB:>9.2f}")
    return "\n".join(lines)


def dry_run(model: nn.Module, dims: ParallelDims, cfg: JobConfig,
            parallelize: Callable[[nn.Module], nn.Module]) -> list[dict]:
    """Pipeline and parallelize `model` (on meta) over the fake process group; print and return per-rank memory."""
    total_params = model.num_params()
    rows = [count_memory(parts, dims, cfg, r, stages)
            for r, stages, parts in _build_parts(model, dims, cfg, parallelize)]
    print(format_table(rows, dims, cfg, total_params), flush=True)
    logger.info("dry run finished: the sharding plan builds at this world size")
    return [asdict(r) | {"total_bytes": r.total_bytes} for r in rows]
