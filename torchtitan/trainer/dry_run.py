"""Scale on paper: apply the real sharding plans over a fake process group and count each rank's bytes.

`COMM_MODE=fake_backend NGPU=512 CONFIG=train_configs/llama3_405b.toml ./run_train.sh`
runs one process that stands for rank 0 of a 512-rank world (torch's "fake"
backend: collectives return at once). The model is built on the meta device and
goes through the same pipeline split and parallelize function as a real run,
so a plan that would fail at scale (a degree that does not divide the heads, a
schedule that needs more micro-batches) fails here too, in seconds, without GPUs.

Memory is read from the local shard shape of every parameter (DTensor
`to_local()`), not from FakeTensorMode allocation tracking, which overcounts
under tensor parallel (docs/debugging.md, "torch.distributed on CPU (gloo): what works and
what does not"). Sharding plans are the same on every rank of a mesh dimension,
so rank 0's TP/FSDP/EP shards stand for all ranks
(FSDP pads every rank's shard to rank 0's size); pipeline stages differ, so every
pipeline rank's stages are built and counted. What FSDP all-gathers is read off
each parameter's placements too: dense weights over dp_shard_cp, a MoE layer's
experts under expert parallel over efsdp only (their ep shard stays local).
Activations depend on batch, sequence, AC and compile and are not estimated.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from torchtitan.config.job_config import Parallelism
from torchtitan.distributed.data_parallel import FSDPSettings
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.pipeline import build_pipeline, build_stage_modules, plan_stages

logger = logging.getLogger("torchtitan")

GIB = 1024 ** 3
ADAM_STATES = 2  # exp_avg and exp_avg_sq, each the dtype and shape of the (sharded) parameter
# The mesh dims FSDP shards over (models/common/parallelize.py): dense weights over dp_shard_cp, experts under
# expert parallel over efsdp. A parameter's all-gather multiplies its local shard by the sizes of these dims.
FSDP_DIMS = ("dp_shard_cp", "efsdp")


@dataclass
class RankMemory:
    """Bytes one rank holds for one pipeline rank's stages (every dp/tp/cp/ep rank of it alike)."""

    pp_rank: int
    stages: list[int]
    layers: int
    params: int  # parameter elements on this rank
    expert_params: int  # of which MoE expert weights
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    gathered_bytes: int  # FSDP: unsharded compute-dtype parameters alive at once (estimate)

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.gathered_bytes


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _is_expert(name: str) -> bool:
    return ".experts." in name  # GroupedExperts' w1/w2/w3, as Decoder.num_params counts them


def _fsdp_ranks(p: torch.Tensor) -> int:
    """How many FSDP ranks `p` is sharded over: what its all-gather multiplies the local shard by."""
    if not isinstance(p, DTensor):
        return 1
    mesh = p.device_mesh
    # FSDP's placement on dim 0 of an already-sharded (TP/EP) parameter is a _StridedShard, which is not
    # is_shard() in torch 2.13: anything neither replicated nor partial is a shard.
    return math.prod(size for name, size, pl in zip(mesh.mesh_dim_names or (), mesh.shape, p.placements)
                     if name in FSDP_DIMS and not (pl.is_replicate() or pl.is_partial()))


def _gathered_unit_bytes(module: nn.Module, dtype_bytes: int) -> int:
    """All-gathered size of `module`'s parameters in the FSDP compute dtype: each gathered over its own FSDP
    ranks (dense weights over dp_shard_cp, experts over efsdp); TP and EP shards stay sharded."""
    return sum(_local(p).numel() * _fsdp_ranks(p) for p in module.parameters()) * dtype_bytes


def count_memory(parts: list[nn.Module], dims: ParallelDims, fsdp: FSDPSettings, pp_rank: int,
                 stages: list[int]) -> RankMemory:
    named = [(n, p) for part in parts for n, p in part.named_parameters()]
    local = [_local(p) for _, p in named]
    numel = sum(t.numel() for t in local)
    expert_numel = sum(t.numel() for (n, _), t in zip(named, local) if _is_expert(n))
    param_bytes = sum(t.numel() * t.element_size() for t in local)
    trainable = [t for (_, p), t in zip(named, local) if p.requires_grad]
    grad_bytes = sum(t.numel() * t.element_size() for t in trainable)
    optimizer_bytes = ADAM_STATES * grad_bytes
    gathered = 0
    if dims.fsdp_enabled:
        dtype_bytes = fsdp.param_dtype.itemsize
        if fsdp.reshard_after_forward:
            # Resharded after each unit's forward (apply_fsdp's units: embedding, each block with its experts,
            # norm + output): at most the current unit and the one prefetched are gathered.
            units = [m for part in parts for m in (part.tok_embeddings, *part.layers.values(), part.output)
                     if m is not None]
            sizes = sorted((_gathered_unit_bytes(u, dtype_bytes) for u in units), reverse=True)
            gathered = sum(sizes[:2])
        else:
            # Kept gathered from forward to backward (the pipeline default): whole stages.
            gathered = sum(_gathered_unit_bytes(part, dtype_bytes) for part in parts)
    layers = sum(len(part.layers) for part in parts)
    return RankMemory(pp_rank=pp_rank, stages=stages, layers=layers, params=numel, expert_params=expert_numel,
                      param_bytes=param_bytes, grad_bytes=grad_bytes, optimizer_bytes=optimizer_bytes,
                      gathered_bytes=gathered)


def _build_parts(model: nn.Module, dims: ParallelDims, parallelism: Parallelism, local_batch_size: int,
                 parallelize: Callable[[nn.Module], nn.Module]) -> list[tuple[int, list[int], list[nn.Module]]]:
    """(pp rank, its stage indices, its parallelized modules) for every pipeline rank; `model` is on meta."""
    if not dims.pp_enabled:
        return [(0, [0], [parallelize(model)])]
    # Rank 0 goes through the trainer's own entry point (stages and schedule included), so the
    # schedule's constraints are checked; the other pipeline ranks only need their modules.
    pipeline = build_pipeline(model, dims=dims, parallelism=parallelism,
                              local_batch_size=local_batch_size, device=torch.device("meta"),
                              parallelize=parallelize, loss_fn=lambda pred, labels: pred.sum())
    plan = plan_stages(parallelism, len(model.layers))
    out = [(0, plan.stages_of(0), pipeline.parts)]
    for r in range(1, dims.pp):
        built = build_stage_modules(model, plan, r, parallelize)
        out.append((r, [s for s, _ in built], [m for _, m in built]))
    return out


def rank_memory_line(parts: list[nn.Module], dims: ParallelDims, fsdp: FSDPSettings) -> str:
    """memory_estimation.enabled in a real run: this rank's parameter, gradient and optimizer bytes."""
    r = count_memory(parts, dims, fsdp, pp_rank=0, stages=[])
    return (f"memory estimate for this rank: params {r.param_bytes / GIB:.2f} GiB, grads {r.grad_bytes / GIB:.2f} GiB, "
            f"AdamW {r.optimizer_bytes / GIB:.2f} GiB, FSDP gathered {r.gathered_bytes / GIB:.2f} GiB, "
            f"total {r.total_bytes / GIB:.2f} GiB (no activations)")


def mesh_line(dims: ParallelDims) -> str:
    """The mesh's own dims and sizes (under expert parallel dp_shard is dp_shard_mod_ep x dp_shard_in_ep)."""
    mesh = dims.mesh
    return "mesh: " + " x ".join(f"{name} {size}" for name, size in zip(mesh.mesh_dim_names, mesh.mesh.shape))


def expert_lines(model: nn.Module, parts: list[nn.Module], dims: ParallelDims) -> list[str]:
    """How a MoE model's experts are laid out over the mesh, and a warning where FSDP pads their shards."""
    moe = model.args.moe
    if moe is None:
        return []
    fsdp = dims.dp_shard * dims.cp
    if not dims.ep_enabled:
        where = f"FSDP-sharded with the dense weights over dp_shard_cp {fsdp}" if dims.fsdp_enabled else "replicated"
        return [f"experts: {moe.num_experts} per MoE layer, no expert parallel: {where}"]
    efsdp = fsdp // dims.ep
    per_ep = f"{moe.num_experts // dims.ep} per ep rank"
    held = (f"{per_ep}, whole (efsdp 1)" if efsdp == 1 else
            f"{per_ep}, FSDP-sharded and all-gathered over efsdp {efsdp} (dp_shard_mod_ep) only")
    lines = [f"experts: {moe.num_experts} per MoE layer over ep {dims.ep} (dp_shard_in_ep {dims.ep // dims.cp} x "
             f"cp {dims.cp}): {held}; dense weights FSDP over dp_shard_cp {fsdp}"]
    expert = next((p for part in parts for n, p in part.named_parameters() if _is_expert(n)), None)
    if expert is not None:
        share = _local(expert).numel() * dims.ep * efsdp / expert.numel()
        if share > 1.01:
            lines.append(f"note: FSDP pads the expert weights: each rank holds {tuple(_local(expert).shape)} of "
                         f"{tuple(expert.shape)}, {share:.1f}x its even share over ep x efsdp = {dims.ep * efsdp} "
                         f"(the dim FSDP shards does not split {efsdp} ways evenly)")
    return lines


def format_table(rows: list[RankMemory], dims: ParallelDims, label: str, total_params: int,
                 notes: Sequence[str] = ()) -> str:
    experts = any(r.expert_params for r in rows)
    lines = [
        f"dry run: {label}, {total_params:,} parameters, world {dims.world_size} "
        f"(fake backend, meta device)",
        mesh_line(dims),
        *notes,
        "per-rank memory of every rank in each pipeline rank's group (parameters, gradients and AdamW state "
        "in the parameter dtype; gathered = FSDP all-gathered compute-dtype weights alive at once; no activations):",
        f"{'pp rank':>7}  {'stages':>8}  {'layers':>6}  {'params':>15}  "
        + (f"{'expert params':>15}  " if experts else "")
        + f"{'param bytes':>15}  {'params GiB':>10}  {'grads GiB':>9}  {'AdamW GiB':>9}  {'gathered GiB':>12}  "
          f"{'total GiB':>9}",
    ]
    for r in rows:
        lines.append(
            f"{r.pp_rank:>7}  {','.join(map(str, r.stages)):>8}  {r.layers:>6}  {r.params:>15,}  "
            + (f"{r.expert_params:>15,}  " if experts else "")
            + f"{r.param_bytes:>15}  {r.param_bytes / GIB:>10.2f}  {r.grad_bytes / GIB:>9.2f}  "
              f"{r.optimizer_bytes / GIB:>9.2f}  {r.gathered_bytes / GIB:>12.2f}  {r.total_bytes / GIB:>9.2f}")
    return "\n".join(lines)


def dry_run(model: nn.Module, dims: ParallelDims, *, parallelism: Parallelism, fsdp: FSDPSettings,
            local_batch_size: int, label: str, parallelize: Callable[[nn.Module], nn.Module]) -> list[dict]:
    """Pipeline and parallelize `model` (on meta) over the fake process group; print and return per-rank memory."""
    total_params = model.num_params()
    built = _build_parts(model, dims, parallelism, local_batch_size, parallelize)
    rows = [count_memory(parts, dims, fsdp, r, stages) for r, stages, parts in built]
    notes = expert_lines(model, built[0][2], dims)
    print(format_table(rows, dims, label, total_params, notes), flush=True)
    logger.info("dry run finished: the sharding plan builds at this world size")
    return [asdict(r) | {"total_bytes": r.total_bytes} for r in rows]
