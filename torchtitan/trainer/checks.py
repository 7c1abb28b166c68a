"""Every check of a job's config, in one place, before any process group exists.

The planners refuse what cannot be planned (ParallelDims.from_config: degrees against the world size;
pipeline.plan_stages: stage splits; BatchPlan.build: the global batch; resolve_sdpa_backend: kernels the
device lacks); this module and trainer/plan.py call them before any process group, so their errors are
preflight errors too.

`check_config` needs only the config: value ranges, and options that would do nothing (the rules of
trainer/effects.py). `check_layout` needs the model's shape, the world size and the device: degrees against
heads, experts and layers, sequence lengths against the mesh and the model, pipeline schedules, fault tolerance,
files that must exist. run_train.sh runs both in one process before torchrun starts, and every rank runs them
again (trainer/plan.py), so a bad combination is one line on stderr and a non-zero exit instead of a hang.

Options whose effect depends on where the job runs (the device, a world size that leaves FSDP out) are not
errors: `layout_notes` logs them, so one config runs on a CPU box and on a cluster.
"""
from __future__ import annotations

import os

import torch

from torchtitan.components.downstream import resolve_tasks
from torchtitan.components.wandb_logger import check_wandb
from torchtitan.config.job_config import JobConfig, MoETraining
from torchtitan.distributed import pipeline
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.pipeline import NO_COMPILE_SCHEDULES, V_SCHEDULES, plan_stages
from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.layers import ATTENTION_CLASSES
from torchtitan.models.common.spec import TrainSpec
from torchtitan.tools.errors import CheckpointError, ConfigError
from torchtitan.trainer.effects import check_effects
from torchtitan.trainer.validate import validation_sets


def _at_least(pairs, low: float = 1) -> None:
    for key, n in pairs:
        if n < low:
            raise ConfigError(f"{key} must be >= {low}, got {n}")


def check_config(cfg: JobConfig) -> None:
    """Checks across keys that need neither the model nor the world size."""
    _check_counts(cfg)
    _check_optimization(cfg)
    _check_profiling_and_ac(cfg)
    if cfg.fault_tolerance.enable:
        _check_fault_tolerance_config(cfg)
    check_effects(cfg)


def _check_counts(cfg: JobConfig) -> None:
    """Step counts, sizes, degrees and timeouts: a 0 would divide by zero or time out at once mid-run."""
    t, p, v, ft = cfg.training, cfg.parallelism, cfg.validation, cfg.fault_tolerance
    _at_least((("training.local_batch_size", t.local_batch_size), ("training.seq_len", t.seq_len),
               ("training.steps", t.steps), ("training.gc_freq", t.gc_freq), ("metrics.log_freq", cfg.metrics.log_freq),
               ("validation.freq", v.freq), ("checkpoint.interval", cfg.checkpoint.interval),
               ("profiling.profile_freq", cfg.profiling.profile_freq),
               ("comm.init_timeout_seconds", cfg.comm.init_timeout_seconds),
               ("comm.train_timeout_seconds", cfg.comm.train_timeout_seconds),
               ("fault_tolerance.timeout_seconds", ft.timeout_seconds),
               ("fault_tolerance.quorum_timeout_seconds", ft.quorum_timeout_seconds),
               *((f"parallelism.{k}", getattr(p, k)) for k in (
                   "data_parallel_replicate_degree", "tensor_parallel_degree", "pipeline_parallel_degree",
                   "context_parallel_degree", "pipeline_parallel_microbatch_size", "expert_parallel_degree"))))
    _at_least((("lr_scheduler.warmup_steps", cfg.lr_scheduler.warmup_steps),
               ("checkpoint.keep_latest_k", cfg.checkpoint.keep_latest_k),
               ("training.loss_chunk_size", t.loss_chunk_size)), low=0)
    for key, n in (("validation.seq_len", v.seq_len), ("validation.local_batch_size", v.local_batch_size),
                   ("validation.steps", v.steps), ("parallelism.data_parallel_shard_degree",
                                                   p.data_parallel_shard_degree)):
        if n == 0 or n < -1:
            raise ConfigError(f"{key} must be -1 or >= 1, got {n}")


def _check_optimization(cfg: JobConfig) -> None:
    """Optimizer, LR schedule and spike guard values torch would reject mid-build, or that make no schedule."""
    t, o, lr = cfg.training, cfg.optimizer, cfg.lr_scheduler
    _at_least((("optimizer.lr", o.lr), ("optimizer.eps", o.eps), ("optimizer.weight_decay", o.weight_decay)), low=0)
    for key, beta in (("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)):
        if not 0 <= beta < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {beta}")
    for key, x in (("lr_scheduler.min_lr_factor", lr.min_lr_factor), ("lr_scheduler.decay_ratio", lr.decay_ratio)):
        if x is not None and not 0 <= x <= 1:
            raise ConfigError(f"{key} must be in [0, 1], got {x}")
    if lr.total_steps is not None and lr.total_steps < t.steps:
        raise ConfigError(f"lr_scheduler.total_steps = {lr.total_steps} must be at least training.steps = {t.steps} "
                          f"(or unset): the schedule would end before the run")
    steps, factor = lr.grad_clip_warmup_steps, lr.grad_clip_warmup_factor
    if (steps is None) != (factor is None):
        raise ConfigError("lr_scheduler.grad_clip_warmup_steps and lr_scheduler.grad_clip_warmup_factor go together "
                          f"(OLMo's gradient-clipping warm-up): set both or neither, got {steps} and {factor}")
    if steps is not None and (steps < 0 or factor <= 0):
        raise ConfigError(f"lr_scheduler.grad_clip_warmup_steps must be >= 0 and lr_scheduler.grad_clip_warmup_factor "
                          f"> 0, got {steps} and {factor}")
    if o.name == "Muon":
        if len(o.muon_ns_coefficients) != 3 or not 1 <= o.muon_ns_steps < 100 or not 0 <= o.muon_momentum < 1:
            raise ConfigError(f"optimizer.muon_ns_coefficients needs 3 values (a, b, c), optimizer.muon_ns_steps 1..99 "
                              f"and optimizer.muon_momentum [0, 1), got {o.muon_ns_coefficients}, "
                              f"{o.muon_ns_steps} and {o.muon_momentum}")
    if o.qk_clip_threshold is not None and o.qk_clip_threshold <= 0:
        raise ConfigError(f"optimizer.qk_clip_threshold must be > 0 (a logit, e.g. 100) or unset, got "
                          f"{o.qk_clip_threshold}")
    if t.spike_guard_sigma < 0 or t.spike_guard_window < 2:
        raise ConfigError(f"training.spike_guard_sigma must be >= 0 and training.spike_guard_window >= 2, got "
                          f"{t.spike_guard_sigma} and {t.spike_guard_window}")


def _check_profiling_and_ac(cfg: JobConfig) -> None:
    prof, ac = cfg.profiling, cfg.activation_checkpoint
    _at_least((("profiling.profiler_active", prof.profiler_active),))
    _at_least((("profiling.profiler_warmup", prof.profiler_warmup),), low=0)
    if prof.profiler_active > prof.profile_freq:
        raise ConfigError(f"profiling.profiler_active = {prof.profiler_active} must be at most profiling.profile_freq "
                          f"= {prof.profile_freq}")
    if ac.mode == "selective" and ac.selective_ac_option != "op":
        if not ac.selective_ac_option.isdigit() or int(ac.selective_ac_option) < 1:
            raise ConfigError("activation_checkpoint.selective_ac_option must be 'op' or a positive integer, got "
                              f"{ac.selective_ac_option!r}")
    for c in cfg.compile.components:
        if c not in ("model", "loss"):
            raise ConfigError(f"compile.components: {c!r} is not one of model, loss")


def _check_fault_tolerance_config(cfg: JobConfig) -> None:
    ft = cfg.fault_tolerance
    if not 0 <= ft.replica_id < ft.group_size:
        raise ConfigError(f"fault_tolerance.replica_id = {ft.replica_id} must be in 0..group_size-1 "
                          f"(fault_tolerance.group_size = {ft.group_size})")
    if not 1 <= ft.min_replica_size <= ft.group_size:
        raise ConfigError(f"fault_tolerance.min_replica_size = {ft.min_replica_size} must be in 1..group_size "
                          f"({ft.group_size})")
    if cfg.parallelism.data_parallel_replicate_degree != 1:
        raise ConfigError(f"parallelism.data_parallel_replicate_degree = "
                          f"{cfg.parallelism.data_parallel_replicate_degree}: with fault tolerance the replicate "
                          "dimension is fault_tolerance.group_size (one torchrun job per replica group); set "
                          "data_parallel_replicate_degree = 1")
    if not (ft.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE")):
        raise ConfigError("fault_tolerance.enable needs the lighthouse address: fault_tolerance.lighthouse = "
                          "http://host:29510 or TORCHFT_LIGHTHOUSE (start it with `torchft_lighthouse "
                          "--min_replicas 1`)")
    if ft.semi_sync_method != "sync":
        _check_semi_sync(cfg)


def _check_semi_sync(cfg: JobConfig) -> None:
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
    if cfg.parallelism.pipeline_parallel_degree > 1:
        raise ConfigError(f"parallelism.pipeline_parallel_degree = {cfg.parallelism.pipeline_parallel_degree} with "
                          f"semi_sync_method = {method}: not supported yet (one model part per rank); use FSDP/TP "
                          "inside a replica group")


def _check_seq_len(key: str, seq_len: int, dims: ParallelDims) -> None:
    if dims.cp > 1 and seq_len % (2 * dims.cp):
        raise ConfigError(f"{key} = {seq_len} must be divisible by 2 x context_parallel_degree = {2 * dims.cp}")
    if dims.tp > 1 and dims.tp * dims.cp > 1 and seq_len % (dims.tp * max(2 * dims.cp, 1)):
        raise ConfigError(f"{key} = {seq_len} must be divisible by tensor_parallel_degree x 2 x "
                          f"context_parallel_degree for sequence parallel")


def _check_validation(cfg: JobConfig, dims: ParallelDims, seq_len: int, batch: int, dry_run: bool) -> None:
    """seq_len and batch: the validation batch shape after its defaults (training's)."""
    v, t = cfg.validation, cfg.training
    if seq_len > t.seq_len:
        raise ConfigError(f"validation.seq_len = {seq_len} exceeds training.seq_len = {t.seq_len}, the length the "
                          f"model is built for (its RoPE table); use at most {t.seq_len}, or -1 for training's")
    _check_seq_len("validation.seq_len", seq_len, dims)
    if dims.pp > 1 and (seq_len, batch) != (t.seq_len, t.local_batch_size):
        raise ConfigError(f"validation.seq_len and validation.local_batch_size must equal training's "
                          f"({t.seq_len}, {t.local_batch_size}) under pipeline parallel: the stages are built for "
                          f"one micro-batch shape; leave them at -1")
    if v.sets and ({"validation.dataset", "validation.dataset_path"} & set(cfg.set_by)):
        raise ConfigError("validation.sets replaces validation.dataset and validation.dataset_path: set one or the "
                          "other")
    for vset in validation_sets(v):
        key = f"validation.sets {vset.name}" if vset.name else "validation.dataset_path"
        if vset.dataset == "memmap" and not vset.path:
            raise ConfigError("validation.dataset = memmap needs validation.dataset_path (a token file or a folder of "
                              "them)" if not vset.name else f"{key} = memmap: needs a path (memmap:PATH)")
        if vset.path and not dry_run and not os.path.exists(vset.path):
            raise ConfigError(f"{key} {vset.path}: no such file or folder")


def _check_moe_options(cfg: JobConfig, args: DecoderArgs, label: str) -> None:
    """[moe] options that do nothing for this model are errors, as trainer/effects.py does for config-only rules
    (a file's [moe] keys are let through when the command line picked another model: the benchmark's dense
    comparator runs the MoE config with a dense flavor)."""
    defaults = MoETraining()
    for name in ("load_balance_loss_weight", "router_z_loss_weight", "load_balance_scope", "expert_bias_update_rate"):
        key = f"moe.{name}"
        if key not in cfg.set_by or getattr(cfg.moe, name) == getattr(defaults, name):
            continue
        where = "the command line" if cfg.set_by[key] == "cli" else cfg.set_by[key]
        model_from_cli = any(cfg.set_by.get(k) == "cli" for k in ("model.name", "model.flavor"))
        if args.moe is None:
            if cfg.set_by[key] != "cli" and model_from_cli:
                continue
            raise ConfigError(f"{key} (set in {where}) has no effect here: {label} is a dense model (no experts)")
        if name == "expert_bias_update_rate" and not args.moe.expert_bias:
            raise ConfigError(f"{key} (set in {where}) has no effect here: the router of {label} has no expert bias")
        if name == "load_balance_scope" and cfg.moe.load_balance_loss_weight == 0:
            raise ConfigError(f"{key} (set in {where}) has no effect here: it needs moe.load_balance_loss_weight > 0")


def _check_model_fits(cfg: JobConfig, spec: TrainSpec, args: DecoderArgs, dims: ParallelDims, label: str) -> None:
    """Degrees against the model's heads, experts and layers; exports the model's HF format can express."""
    attention = ATTENTION_CLASSES[args.attention]
    if dims.tp > 1 and not attention.tensor_parallel:
        raise ConfigError(f"parallelism.tensor_parallel_degree = {dims.tp}: {label}'s {attention.description} "
                          f"is not sharded by tensor parallel; use FSDP, expert, context or pipeline parallel "
                          f"(tensor_parallel_degree = 1)")
    if args.n_heads % dims.tp or args.kv_heads % dims.tp:
        raise ConfigError(f"parallelism.tensor_parallel_degree = {dims.tp} must divide the model's {args.n_heads} "
                          f"attention heads and {args.kv_heads} KV heads ({label})")
    _check_moe_options(cfg, args, label)
    if dims.ep > 1 and args.moe is None:
        raise ConfigError(f"parallelism.expert_parallel_degree = {dims.ep} needs a mixture-of-experts model; {label} "
                          f"is dense (no experts)")
    if args.moe is not None and args.moe.num_experts % dims.ep:
        raise ConfigError(f"parallelism.expert_parallel_degree = {dims.ep} must divide the {args.moe.num_experts} "
                          f"experts of {label}")
    if cfg.optimizer.qk_clip_threshold is not None:
        _check_qk_clip(cfg, args, dims, label)
    if cfg.checkpoint.last_save_in_hf:
        try:
            spec.adapter(args).check_expressible()
        except CheckpointError as e:
            raise ConfigError(f"checkpoint.last_save_in_hf: {e}") from None
    if dims.pp > args.n_layers:
        raise ConfigError(f"parallelism.pipeline_parallel_degree = {dims.pp} exceeds the {args.n_layers} layers of "
                          f"{label}")


def _check_qk_clip(cfg: JobConfig, args: DecoderArgs, dims: ParallelDims, label: str) -> None:
    """QK-clip scales the q/k projections of grouped-query attention, tracked in an eager forward."""
    why = None
    if args.attention != "gqa":
        why = f"its {ATTENTION_CLASSES[args.attention].description} has no per-head q/k projections to scale"
    elif args.qk_norm:
        why = "it normalizes q and k (qk_norm): scaling their projections would not change the logits"
    elif args.clip_qkv is not None:
        why = "model clip_qkv clamps q and k: the logits are bounded already"
    elif dims.cp > 1:
        why = "context parallel attends K/V chunks on other ranks, where no rank sees a whole head's logits"
    elif cfg.compile.enable:
        why = "compile.enable: the tracked maximum is a side effect a compiled block does not keep"
    if why is not None:
        raise ConfigError(f"optimizer.qk_clip_threshold cannot be used with {label}: {why}")


def _check_pipeline(cfg: JobConfig, args: DecoderArgs, label: str, on_cpu: bool, compiled: bool) -> None:
    """Every pipeline constraint torch would otherwise report mid-run (or as a hang)."""
    p, t = cfg.parallelism, cfg.training
    pp = p.pipeline_parallel_degree
    if pp <= 1:
        return
    if t.local_batch_size % p.pipeline_parallel_microbatch_size:
        raise ConfigError(f"training.local_batch_size = {t.local_batch_size} must be a multiple of "
                          f"parallelism.pipeline_parallel_microbatch_size = {p.pipeline_parallel_microbatch_size}")
    plan = plan_stages(p, args.n_layers)  # refuses split points, stage counts and CSV files that cannot run
    schedule, n_mb = p.pipeline_parallel_schedule, t.local_batch_size // p.pipeline_parallel_microbatch_size
    if schedule in ("1F1B", "DualPipeV") and n_mb < plan.num_stages:
        raise ConfigError(f"schedule {schedule} needs at least as many micro-batches as stages ({plan.num_stages}): "
                          f"training.local_batch_size / parallelism.pipeline_parallel_microbatch_size = {n_mb}")
    rounds = max(1, n_mb // pp)
    if schedule in ("Interleaved1F1B", "InterleavedZeroBubble") and n_mb % rounds:
        raise ConfigError(f"schedule {schedule} runs micro-batches in rounds of pipeline_parallel_degree = {pp}: "
                          f"{n_mb} micro-batches (training.local_batch_size / pipeline_parallel_microbatch_size) "
                          f"do not split into {rounds} equal rounds; use a multiple of {pp}")
    if schedule in NO_COMPILE_SCHEDULES and compiled:
        raise ConfigError(f"schedule {schedule} splits backward into input and weight passes, which torch does not "
                          f"support on compiled stages; set compile.enable = false or use Interleaved1F1B")
    if schedule in V_SCHEDULES and on_cpu and pipeline.warmup_sends_to_self():
        raise ConfigError(f"schedule {schedule} puts neighbouring stages on one rank, and torch {torch.__version__} "
                          f"opens pipeline links with a send to that same rank, which gloo (CPU) cannot do; on CPU "
                          f"use torch >= 2.12 or another schedule (Interleaved1F1B, InterleavedZeroBubble)")


def _check_files(cfg: JobConfig) -> None:
    d = cfg.data
    if d.document_masking and d.dataset == "memmap" and not cfg.model.tokenizer_path:
        raise ConfigError("data.document_masking on memmap data needs model.tokenizer_path: documents end at the "
                          "EOS id of the tokenizer that wrote the token files, not the bundled debug tokenizer's")
    if d.dataset == "memmap" and not (d.memmap_paths or d.sources):
        raise ConfigError("data.dataset = memmap needs data.memmap_paths or [[data.sources]] tables")
    c = cfg.checkpoint
    if c.reset_trainer_state and c.initial_load_model_only and "checkpoint.initial_load_model_only" in cfg.set_by:
        raise ConfigError("checkpoint.reset_trainer_state loads the weights and the optimizer moments, "
                          "checkpoint.initial_load_model_only = true the weights alone: set one of them")
    if d.memmap_paths and d.sources:
        raise ConfigError("data.memmap_paths and [[data.sources]] are both set: list the files in the sources "
                          "(a source each), or use memmap_paths alone")
    if d.memmap_label_mask_paths and d.sources:
        raise ConfigError("data.memmap_label_mask_paths is for data.memmap_paths; with [[data.sources]] give each "
                          "source its label_mask_paths")
    for key, path in (("model.tokenizer_path", cfg.model.tokenizer_path), ("data.dataset_path", d.dataset_path),
                      ("checkpoint.initial_load_path", cfg.checkpoint.initial_load_path)):
        if path and not os.path.exists(path):
            raise ConfigError(f"{key} {path}: no such file or folder")


def check_layout(cfg: JobConfig, spec: TrainSpec, args: DecoderArgs, dims: ParallelDims, *, device_type: str,
                 validation_shape: tuple[int, int]) -> None:
    """Checks that need the model's shape, the degrees and the device; validation_shape: (seq_len, batch) of
    validation after its defaults. A dry run (comm.mode = fake_backend) reads no tokenizer, data or checkpoint."""
    p, t = cfg.parallelism, cfg.training
    label = f"{cfg.model.name} {cfg.model.flavor}"
    dry_run = cfg.comm.mode == "fake_backend"
    on_cuda = device_type == "cuda" or dry_run  # a dry run plans the GPU job (GPU-only features are not applied)
    if cfg.checkpoint.create_seed_checkpoint:
        if dims.world_size > 1:
            raise ConfigError(f"checkpoint.create_seed_checkpoint needs a single process (NGPU=1 and all parallel "
                              f"degrees 1), but the world size is {dims.world_size}")
        if not cfg.checkpoint.enable:
            raise ConfigError("checkpoint.create_seed_checkpoint needs checkpoint.enable_checkpoint")
    _check_model_fits(cfg, spec, args, dims, label)
    _check_seq_len("training.seq_len", t.seq_len, dims)
    if t.fused_output_loss and t.loss_chunk_size <= 0:
        raise ConfigError("training.fused_output_loss needs training.loss_chunk_size > 0 (tokens per chunk, e.g. 2048)")
    if t.fused_output_loss and dims.tp > 1:
        raise ConfigError("training.fused_output_loss cannot run with tensor_parallel_degree > 1: the output layer is "
                          "vocab-sharded there and its loss runs under loss parallel; use loss_chunk_size alone")
    compiled = cfg.compile.enable and "model" in cfg.compile.components
    _check_pipeline(cfg, args, label, on_cpu=not on_cuda, compiled=compiled)
    if p.enable_async_tensor_parallel and not (cfg.compile.enable and on_cuda):
        raise ConfigError("parallelism.enable_async_tensor_parallel needs CUDA and compile.enable")
    if "float8" in cfg.model.converters and not on_cuda:
        raise ConfigError("model.converters float8 needs a CUDA GPU with float8 support (torchao)")
    if not dry_run:
        _check_files(cfg)
        if cfg.metrics.enable_wandb:
            check_wandb(cfg.metrics, cfg.job.dump_folder)
    if cfg.validation.enable:
        _check_validation(cfg, dims, *validation_shape, dry_run)
    if cfg.downstream_eval.enable:
        _check_downstream(cfg, dims)


def _check_downstream(cfg: JobConfig, dims: ParallelDims) -> None:
    d, t = cfg.downstream_eval, cfg.training
    _at_least((("downstream_eval.freq", d.freq),))
    _at_least((("downstream_eval.limit", d.limit), ("downstream_eval.local_batch_size", d.local_batch_size)), low=0)
    if d.batch_tokens == 0 or d.batch_tokens < -1 or d.model_ctx_len == 0 or d.model_ctx_len < -1:
        raise ConfigError(f"downstream_eval.batch_tokens and downstream_eval.model_ctx_len must be -1 or >= 1, got "
                          f"{d.batch_tokens} and {d.model_ctx_len}")
    if d.model_ctx_len > t.seq_len:
        raise ConfigError(f"downstream_eval.model_ctx_len = {d.model_ctx_len} exceeds training.seq_len = {t.seq_len}, "
                          f"the length the model is built for; use at most {t.seq_len}, or -1 for training's")
    if dims.pp > 1 and (d.batch_tokens != -1 or d.local_batch_size != 0):
        raise ConfigError("downstream_eval.batch_tokens and downstream_eval.local_batch_size cannot be set under "
                          "pipeline parallel: evaluation batches take training's shape (the stages are built for one "
                          "micro-batch shape)")
    resolve_tasks(d.tasks, "downstream_eval.tasks")


def layout_notes(cfg: JobConfig, dims: ParallelDims, device_type: str) -> list[str]:
    """Options the user set that do nothing where this job runs (the device, a layout without FSDP). Logged, not
    errors: one config must run on a CPU box and on a cluster (trainer/effects.py has the static rules)."""
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
    if "training.cpu_keep_freed_memory" in set_by and device_type != "cpu":
        notes.append(f"training.cpu_keep_freed_memory has no effect on {device_type}: it sets how host memory "
                     f"holding CPU activations is reused")
    blockwise = "context parallel" if dims.cp > 1 else "document masking" if cfg.data.document_masking else None
    if "model.sdpa_backend" in set_by and cfg.model.sdpa_backend not in ("auto", "default") and blockwise:
        notes.append(f"model.sdpa_backend = {cfg.model.sdpa_backend} has no effect with {blockwise}: attention runs "
                     f"blockwise (ops/blockwise.py picks its kernels)")
    return notes
