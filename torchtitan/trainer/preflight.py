"""Checks that need the world size and model shape but no process group.

They run before `init_process_group` (run_train.sh runs them once before torchrun
starts, and every rank again), so a bad combination is one clear line on stderr
and a non-zero exit instead of a hang.
"""
from __future__ import annotations

import os
import sys

import torch

from torchtitan.config import load_config, to_toml
from torchtitan.config.job_config import JobConfig, MoETraining
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.pipeline import check_pipeline_config
from torchtitan.models import get_train_spec
from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.spec import TrainSpec
from torchtitan.ops.attention import resolve_sdpa_backend
from torchtitan.tools.device import detect_device_type
from torchtitan.tools.dtypes import DTYPES
from torchtitan.tools.errors import EXIT_CONFIG_ERROR, CheckpointError, ConfigError, UserError


def check_job(argv: list[str] | None, world_size: int | None, env=None) -> JobConfig | int:
    """Load the job config and check it against the world size (None: not known yet): the config, or the exit
    code after printing the config (--job.print_config, 0) or a one-line error (EXIT_CONFIG_ERROR)."""
    try:
        cfg = load_config(argv, env)
        if cfg.job.print_config:
            print(to_toml(cfg))
            return 0
        if world_size is not None:
            preflight(cfg, world_size)
        return cfg
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


def build_model_args(spec: TrainSpec, cfg: JobConfig, device_type: str) -> DecoderArgs:
    """The flavor's args with this job's run settings (vocab override, sequence length, SDPA backend)."""
    args = spec.model_args(cfg.model.flavor)
    if cfg.model.vocab_size > 0:
        args.vocab_size = cfg.model.vocab_size
    args.max_seq_len = cfg.training.seq_len
    args.sdpa_backend = resolve_sdpa_backend(cfg.model.sdpa_backend, device_type)
    return args


def layout_notes(cfg: JobConfig, dims: ParallelDims, device_type: str) -> list[str]:
    """Options the user set that do nothing where this job runs (the device, a layout without FSDP). Logged, not
    errors: one config must run on a CPU box and on a cluster (config/effects.py has the static checks)."""
    t, set_by, notes = cfg.training, cfg.set_by, []
    fsdp = "FSDP is off in this layout (data_parallel_shard_degree x context_parallel_degree = 1)"
    if "training.enable_cpu_offload" in set_by and t.enable_cpu_offload and not dims.fsdp_enabled:
        notes.append(f"training.enable_cpu_offload has no effect: {fsdp}")
    if "parallelism.fsdp_reshard_after_forward" in set_by and not dims.fsdp_enabled:
        notes.append(f"parallelism.fsdp_reshard_after_forward has no effect: {fsdp}")
    if "training.mixed_precision_reduce" in set_by and not dims.fsdp_enabled:
        notes.append(f"training.mixed_precision_reduce has no effect: {fsdp}; gradients are reduced in the "
                     f"parameter dtype")
    if "training.mixed_precision_param" in set_by and t.mixed_precision_param != "float32" and device_type != "cuda":
        notes.append(f"training.mixed_precision_param = {t.mixed_precision_param} has no effect on {device_type}: "
                     f"training runs in float32 there")
    blockwise = "context parallel" if dims.cp > 1 else "document masking" if t.document_masking else None
    if "model.sdpa_backend" in set_by and cfg.model.sdpa_backend not in ("auto", "default") and blockwise:
        notes.append(f"model.sdpa_backend = {cfg.model.sdpa_backend} has no effect with {blockwise}: attention runs "
                     f"blockwise (ops/blockwise.py picks its kernels)")
    return notes


def autocast_dtype(cfg: JobConfig, dims: ParallelDims, device_type: str) -> torch.dtype | None:
    """The compute dtype to autocast to where FSDP's mixed precision does not apply (one GPU, DDP, pipeline
    stages without FSDP): training.mixed_precision_param takes effect on every CUDA layout. CPU runs in float32."""
    dtype = DTYPES[cfg.training.mixed_precision_param]
    if device_type != "cuda" or dims.fsdp_enabled or dtype == torch.float32:
        return None
    return dtype


def compiled_model(cfg: JobConfig) -> bool:
    return cfg.compile.enable and "model" in cfg.compile.components


def compile_loss_enabled(cfg: JobConfig, tp_degree: int) -> bool:
    """Compile the loss unless it runs vocab-sharded under loss_parallel: torch 2.13 computes a compiled
    cross-entropy on sharded logits wrongly (step-1 loss 2.39 instead of 8.19), so there it stays eager."""
    wanted = cfg.compile.enable and "loss" in cfg.compile.components
    return wanted and not (tp_degree > 1 and not cfg.parallelism.disable_loss_parallel)


def _check_seq_len(key: str, seq_len: int, dims: ParallelDims) -> None:
    if dims.cp > 1 and seq_len % (2 * dims.cp):
        raise ConfigError(f"{key} = {seq_len} must be divisible by 2 x context_parallel_degree = {2 * dims.cp}")
    if dims.tp > 1 and dims.tp * dims.cp > 1 and seq_len % (dims.tp * max(2 * dims.cp, 1)):
        raise ConfigError(f"{key} = {seq_len} must be divisible by tensor_parallel_degree x 2 x "
                          f"context_parallel_degree for sequence parallel")


def _check_validation(cfg: JobConfig, dims: ParallelDims, dry_run: bool) -> None:
    v, t = cfg.validation, cfg.training
    _check_seq_len("validation.seq_len", v.seq_len, dims)
    if dims.pp > 1 and (v.seq_len, v.local_batch_size) != (t.seq_len, t.local_batch_size):
        raise ConfigError(f"validation.seq_len and validation.local_batch_size must equal training's "
                          f"({t.seq_len}, {t.local_batch_size}) under pipeline parallel: the stages are built for "
                          f"one micro-batch shape")
    if v.dataset == "memmap" and not v.dataset_path:
        raise ConfigError("validation.dataset = memmap needs validation.dataset_path (a token file or a folder of "
                          "them)")
    if v.dataset_path and not dry_run and not os.path.exists(v.dataset_path):
        raise ConfigError(f"validation.dataset_path {v.dataset_path}: no such file or folder")


def _check_semi_sync(cfg: JobConfig, dims: ParallelDims) -> None:
    """DiLoCo syncs every sync_steps steps; only there do the groups hold the same (global) weights, so the last
    step and the checkpoints must fall on syncs."""
    ft, method = cfg.fault_tolerance, cfg.fault_tolerance.semi_sync_method
    h = ft.sync_steps
    if h < 1:
        raise ConfigError(f"fault_tolerance.sync_steps = {h} must be at least 1")
    if cfg.training.steps % h:
        raise ConfigError(f"training.steps = {cfg.training.steps} must be a multiple of fault_tolerance.sync_steps "
                          f"= {h} with semi_sync_method = {method}: the run ends on a sync")
    ckpt = cfg.checkpoint
    if ckpt.enable and ckpt.interval_type == "steps" and ckpt.interval % h:
        raise ConfigError(f"checkpoint.interval = {ckpt.interval} must be a multiple of fault_tolerance.sync_steps = "
                          f"{h} with semi_sync_method = {method}: checkpoints hold the weights of a sync")
    if ckpt.enable and ckpt.interval_type != "steps":
        raise ConfigError(f"checkpoint.interval_type = {ckpt.interval_type} with semi_sync_method = {method}: use "
                          f"steps (a multiple of fault_tolerance.sync_steps), so checkpoints fall on syncs")
    if dims.pp > 1:
        raise ConfigError(f"parallelism.pipeline_parallel_degree = {dims.pp} with semi_sync_method = {method}: not "
                          "supported yet (one model part per rank); use FSDP/TP inside a replica group")


def _check_moe_options(cfg: JobConfig, args: DecoderArgs, label: str) -> None:
    """[moe] options that do nothing for this model are errors, as config/effects.py does for config-only rules
    (a file's [moe] keys are let through when the command line picked another model: the benchmark's dense
    comparator runs the MoE config with a dense flavor)."""
    defaults = MoETraining()
    for name in ("load_balance_loss_weight", "router_z_loss_weight", "load_balance_scope", "expert_bias_update_rate"):
        key = f"moe.{name}"
        if key not in cfg.set_by or getattr(cfg.moe, name) == getattr(defaults, name):
            continue
        where = "the command line" if cfg.set_by[key] == "cli" else cfg.job.config_file
        model_from_cli = any(cfg.set_by.get(k) == "cli" for k in ("model.name", "model.flavor"))
        if args.moe is None:
            if cfg.set_by[key] == "file" and model_from_cli:
                continue
            raise ConfigError(f"{key} (set in {where}) has no effect here: {label} is a dense model (no experts)")
        if name == "expert_bias_update_rate" and not args.moe.expert_bias:
            raise ConfigError(f"{key} (set in {where}) has no effect here: the router of {label} has no expert bias")
        if name == "load_balance_scope" and cfg.moe.load_balance_loss_weight == 0:
            raise ConfigError(f"{key} (set in {where}) has no effect here: it needs moe.load_balance_loss_weight > 0")


def preflight(cfg: JobConfig, world_size: int) -> None:
    spec = get_train_spec(cfg.model.name)
    args = spec.model_args(cfg.model.flavor)
    label = f"{cfg.model.name} {cfg.model.flavor}"
    p, t = cfg.parallelism, cfg.training
    on_cuda = detect_device_type() == "cuda"
    if cfg.checkpoint.create_seed_checkpoint:
        if world_size > 1:
            raise ConfigError(f"checkpoint.create_seed_checkpoint needs a single process (NGPU=1 and all parallel "
                              f"degrees 1), but the world size is {world_size}")
        if not cfg.checkpoint.enable:
            raise ConfigError("checkpoint.create_seed_checkpoint needs checkpoint.enable_checkpoint")
    dims = ParallelDims.from_config(p, world_size)
    if args.n_heads % dims.tp or args.kv_heads % dims.tp:
        raise ConfigError(f"parallelism.tensor_parallel_degree = {dims.tp} must divide the model's {args.n_heads} "
                          f"attention heads and {args.kv_heads} KV heads ({label})")
    _check_moe_options(cfg, args, label)
    if dims.ep > 1 and args.moe is None:
        raise ConfigError(f"parallelism.expert_parallel_degree = {dims.ep} needs a mixture-of-experts model; {label} "
                          f"is dense (olmoe is a MoE family)")
    if args.moe is not None and args.moe.num_experts % dims.ep:
        raise ConfigError(f"parallelism.expert_parallel_degree = {dims.ep} must divide the {args.moe.num_experts} "
                          f"experts of {label}")
    if args.moe is not None and args.moe.shared_expert_hidden_dim and dims.tp > 1:
        raise ConfigError(f"{label} has a shared expert, which tensor parallel does not support yet; set "
                          f"parallelism.tensor_parallel_degree = 1")
    if cfg.checkpoint.last_save_in_hf:
        try:
            spec.adapter(args).check_expressible()
        except CheckpointError as e:
            raise ConfigError(f"checkpoint.last_save_in_hf: {e}") from None
    if dims.pp > args.n_layers:
        raise ConfigError(f"parallelism.pipeline_parallel_degree = {dims.pp} exceeds the {args.n_layers} layers of "
                          f"{label}")
    _check_seq_len("training.seq_len", t.seq_len, dims)
    if dims.pp > 1 and t.local_batch_size % p.pipeline_parallel_microbatch_size:
        raise ConfigError(f"training.local_batch_size = {t.local_batch_size} must be a multiple of "
                          f"parallelism.pipeline_parallel_microbatch_size = {p.pipeline_parallel_microbatch_size}")
    if t.fused_output_loss and t.loss_chunk_size <= 0:
        raise ConfigError("training.fused_output_loss needs training.loss_chunk_size > 0 (tokens per chunk, e.g. 2048)")
    if t.fused_output_loss and dims.tp > 1:
        raise ConfigError("training.fused_output_loss cannot run with tensor_parallel_degree > 1: the output layer is "
                          "vocab-sharded there and its loss runs under loss parallel; use loss_chunk_size alone")
    dry_run = cfg.comm.mode == "fake_backend"  # builds the model only: no tokenizer or data is read
    check_pipeline_config(p, args, local_batch_size=t.local_batch_size, compiled=compiled_model(cfg),
                          on_cpu=not on_cuda and not dry_run, model_label=label)
    per_micro = t.local_batch_size * dims.dp
    if t.global_batch_size > 0 and t.global_batch_size % per_micro:
        raise ConfigError(f"training.global_batch_size = {t.global_batch_size} must be a multiple of local_batch_size "
                          "x "
                          f"data-parallel degree = {t.local_batch_size} x {dims.dp} = {per_micro}")
    if p.enable_async_tensor_parallel and not (cfg.compile.enable and on_cuda):
        raise ConfigError("parallelism.enable_async_tensor_parallel needs CUDA and compile.enable")
    if t.document_masking and t.dataset == "memmap" and not cfg.model.tokenizer_path:
        raise ConfigError("training.document_masking on memmap data needs model.tokenizer_path: documents end at the "
                          "EOS id of the tokenizer that wrote the token files, not the bundled debug tokenizer's")
    if cfg.model.tokenizer_path and not dry_run and not os.path.exists(cfg.model.tokenizer_path):
        raise ConfigError(f"model.tokenizer_path {cfg.model.tokenizer_path}: no such file or folder")
    if t.dataset_path and not dry_run and not os.path.exists(t.dataset_path):
        raise ConfigError(f"training.dataset_path {t.dataset_path}: no such file or folder")
    load = cfg.checkpoint.initial_load_path
    if load and not dry_run and not os.path.exists(load):
        raise ConfigError(f"checkpoint.initial_load_path {load}: no such folder")
    if cfg.validation.enable:
        _check_validation(cfg, dims, dry_run)
    if t.dataset == "memmap" and not t.memmap_paths and not dry_run:
        raise ConfigError("training.dataset = memmap needs training.memmap_paths")
    if cfg.float8.recipe_name and "float8" in cfg.model.converters and not on_cuda:
        raise ConfigError("model.converters float8 needs a CUDA GPU with float8 support (torchao)")
    if cfg.fault_tolerance.enable and cfg.fault_tolerance.semi_sync_method != "sync":
        _check_semi_sync(cfg, dims)
