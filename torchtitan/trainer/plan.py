"""The job's plan: every decision made from the config once, before any process group, and read by everyone.

train.py, the dataloader, metrics and fault tolerance read the plan (model args, mesh degrees, batch arithmetic,
autocast and compile decisions) instead of recomputing them from the config. `check_job` loads the config, runs
every check (trainer/checks.py) and makes the plan; run_train.sh calls it before torchrun starts and every rank
calls it again.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from torchtitan.config import load_config, to_toml
from torchtitan.config.batch import BatchPlan
from torchtitan.config.job_config import JobConfig
from torchtitan.datasets.mixture import check_sources
from torchtitan.distributed.data_parallel import FSDPSettings, reshard_policy
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.models import get_train_spec
from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.spec import TrainSpec
from torchtitan.ops.attention import resolve_sdpa_backend
from torchtitan.tools.device import detect_device_type
from torchtitan.tools.dtypes import DTYPES
from torchtitan.tools.errors import EXIT_CONFIG_ERROR, UserError
from torchtitan.trainer.checks import check_config, check_layout, layout_notes
from torchtitan.trainer.effects import effect_notes


@dataclass(frozen=True)
class Plan:
    device_type: str  # "cuda" or "cpu": the one place the device type is decided
    dims: ParallelDims  # degrees (the mesh is built on them once the process group exists)
    spec: TrainSpec
    model_args: DecoderArgs  # the flavor's, with this job's vocabulary, sequence length and SDPA backend
    batch: BatchPlan  # micro-batches, accumulation, global batch and tokens per step
    validation_shape: tuple[int, int]  # (seq_len, local_batch_size) of validation batches
    fsdp: FSDPSettings  # what FSDP is told (where FSDP is on)
    autocast: torch.dtype | None  # compute dtype where FSDP's mixed precision does not apply
    compile_loss: bool  # the loss is compiled (not under TP loss parallel: see compile_loss_enabled)
    float8: bool  # the float8 converter applies
    seed: int  # weight init and data order
    dry_run: bool  # comm.mode = fake_backend: build and shard on the meta device only
    notes: tuple[str, ...] = ()  # options that do nothing where this job runs (logged at start)


def build_model_args(spec: TrainSpec, cfg: JobConfig, device_type: str) -> DecoderArgs:
    """The flavor's args with this job's run settings (vocab override, sequence length, SDPA backend)."""
    args = spec.model_args(cfg.model.flavor)
    if cfg.model.vocab_size > 0:
        args.vocab_size = cfg.model.vocab_size
    args.max_seq_len = cfg.training.seq_len
    args.sdpa_backend = resolve_sdpa_backend(cfg.model.sdpa_backend, device_type)
    return args


def autocast_dtype(cfg: JobConfig, dims: ParallelDims, device_type: str) -> torch.dtype | None:
    """The compute dtype to autocast to where FSDP's mixed precision does not apply (one GPU, DDP, pipeline
    stages without FSDP): training.mixed_precision_param takes effect on every CUDA layout. CPU runs in float32."""
    dtype = DTYPES[cfg.training.mixed_precision_param]
    if device_type != "cuda" or dims.fsdp_enabled or dtype == torch.float32:
        return None
    return dtype


def compile_loss_enabled(cfg: JobConfig, tp_degree: int) -> bool:
    """Compile the loss unless it runs vocab-sharded under loss_parallel: torch 2.13 computes a compiled
    cross-entropy on sharded logits wrongly (step-1 loss 2.39 instead of 8.19), so there it stays eager."""
    wanted = cfg.compile.enable and "loss" in cfg.compile.components
    return wanted and not (tp_degree > 1 and not cfg.parallelism.disable_loss_parallel)


def fsdp_settings(cfg: JobConfig, dims: ParallelDims, device_type: str, dry_run: bool) -> FSDPSettings:
    """CPU has no bf16 fast path worth the precision loss: it trains in float32. A dry run plans for the GPU."""
    t = cfg.training
    param = DTYPES[t.mixed_precision_param] if device_type == "cuda" or dry_run else torch.float32
    return FSDPSettings(param_dtype=param, reduce_dtype=DTYPES[t.mixed_precision_reduce],
                        reshard_after_forward=reshard_policy(cfg.parallelism.fsdp_reshard_after_forward,
                                                             dims.pp_enabled),
                        cpu_offload=t.enable_cpu_offload)


def make_plan(cfg: JobConfig, world_size: int, device_type: str | None = None) -> Plan:
    """Check the job against the world size and the device, then decide everything the run reads."""
    device_type = device_type or detect_device_type()
    check_config(cfg)
    t, v, ft = cfg.training, cfg.validation, cfg.fault_tolerance
    spec = get_train_spec(cfg.model.name)
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    args = build_model_args(spec, cfg, device_type)
    validation_shape = (v.seq_len if v.seq_len > 0 else t.seq_len,
                        v.local_batch_size if v.local_batch_size > 0 else t.local_batch_size)
    check_layout(cfg, spec, args, dims, device_type=device_type, validation_shape=validation_shape)
    batch = BatchPlan.build(local_batch_size=t.local_batch_size, global_batch_size=t.global_batch_size,
                            seq_len=t.seq_len, dp=dims.dp, groups=ft.group_size if ft.enable else 1)
    dry_run = cfg.comm.mode == "fake_backend"
    if cfg.data.dataset == "memmap" and cfg.data.sources and not dry_run:
        # Every source must hold its share within its cap: an error now, before any process group exists.
        check_sources(cfg.data.sources, dtype=cfg.data.memmap_dtype, seq_len=t.seq_len,
                      budget=t.steps * batch.global_batch_size)
    notes = [*cfg.notes, *effect_notes(cfg), *layout_notes(cfg, dims, device_type)]
    compile_loss = compile_loss_enabled(cfg, dims.tp)
    if cfg.compile.enable and "loss" in cfg.compile.components and not compile_loss:
        notes.append("compile: the loss stays eager under tensor-parallel loss_parallel (trainer/plan.py)")
    float8 = "float8" in cfg.model.converters
    if dry_run and (float8 or cfg.parallelism.enable_async_tensor_parallel):
        notes.append("dry run: float8 and async TP need a GPU and are not applied; the plan and memory are those of "
                     "the model without them")
    return Plan(device_type=device_type, dims=dims, spec=spec, model_args=args, batch=batch,
                validation_shape=validation_shape, fsdp=fsdp_settings(cfg, dims, device_type, dry_run),
                autocast=autocast_dtype(cfg, dims, device_type),
                compile_loss=compile_loss, float8=float8 and not dry_run,
                seed=t.seed if t.seed is not None else 0, dry_run=dry_run,
                notes=tuple(notes))


def check_job(argv: list[str] | None, world_size: int | None, env=None) -> tuple[JobConfig, Plan | None] | int:
    """Load the job config, check it and plan it for the world size (None: not known yet, config checks only):
    (config, plan), or the exit code after printing the config (--job.print_config, 0) or a one-line error
    (EXIT_CONFIG_ERROR)."""
    try:
        cfg = load_config(argv, env)
        if cfg.job.print_config and cfg.set_by.get("job.print_config") == "cli":
            print(to_toml(cfg, origins=True))
            return 0
        if world_size is None:
            check_config(cfg)
            return cfg, None
        return cfg, make_plan(cfg, world_size)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
