"""Options that the user set but that have no effect in this configuration: an error naming what they need.

Each requirement says which keys need which setting (their switch). A key the user set whose switch is off
is an error, with one exception: a key from a config file whose switch was set explicitly (in a file, e.g.
`[validation] enable = false` above its settings, or turned off on the command line, `--checkpoint.no-enable`
for a quick try of a production config) is reported as a note instead: the file keeps the settings for when the
switch is on, and the command line cannot remove a key from a file. A key set under a torchtitan name
(config/torchtitan_keys.py) whose switch is off is a note too: torchtitan's configs keep such settings and its
loader took them. Only keys the user set to something other than the default count.

Options whose effect depends on where the job runs (the device, or a world size that leaves FSDP out) are
logged by trainer/checks.py (layout_notes), so one config runs on a CPU box and on a cluster.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torchtitan.tools.errors import ConfigError

if TYPE_CHECKING:
    from torchtitan.config.job_config import JobConfig


@dataclass(frozen=True)
class Requirement:
    keys: tuple[str, ...]  # options that only act when...
    switch: str  # ...this key...
    met: Callable[[JobConfig], bool]  # ...makes this true
    needs: str  # what to set, for the message


_CHECKPOINT_OPTIONS = ("folder", "interval_type", "interval", "keep_latest_k", "load_step", "last_save_model_only",
                       "last_save_in_hf", "export_dtype", "async_mode", "exclude_from_loading",
                       "enable_first_step_checkpoint")
_MEMMAP_OPTIONS = ("memmap_paths", "memmap_dtype", "memmap_label_mask_paths", "data_order_ignore_fingerprint",
                   "sources", "instance_filter")
_FILTER_OPTIONS = ("instance_filter_max_period", "instance_filter_min_period", "instance_filter_max_count")
_PIPELINE_OPTIONS = ("pipeline_parallel_schedule", "pipeline_parallel_schedule_csv", "pipeline_parallel_split_points",
                     "pipeline_parallel_layers_per_stage", "pipeline_parallel_microbatch_size")

_VALIDATION_OPTIONS = ("freq", "steps", "dataset", "dataset_path", "seq_len", "local_batch_size", "sets")

_DOWNSTREAM_OPTIONS = ("tasks", "freq", "limit", "batch_tokens", "local_batch_size", "model_ctx_len", "fatal")

_FT_OPTIONS = ("replica_id", "group_size", "min_replica_size", "lighthouse", "timeout_seconds",
               "quorum_timeout_seconds", "log_weight_digest", "semi_sync_method")
_DILOCO_OPTIONS = ("sync_steps", "outer_lr", "outer_momentum")
_MUON_OPTIONS = ("momentum", "nesterov", "ns_steps", "ns_coefficients", "ns_dtype", "adjust_lr")
_WANDB_OPTIONS = ("wandb_project", "wandb_entity", "wandb_run_name", "wandb_group", "wandb_tags", "wandb_mode")

REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement(tuple(f"fault_tolerance.{k}" for k in _FT_OPTIONS), "fault_tolerance.enable",
                lambda c: c.fault_tolerance.enable, "fault_tolerance.enable = true"),
    Requirement(tuple(f"fault_tolerance.{k}" for k in _DILOCO_OPTIONS), "fault_tolerance.semi_sync_method",
                lambda c: c.fault_tolerance.enable and c.fault_tolerance.semi_sync_method == "diloco",
                "fault_tolerance.enable = true and fault_tolerance.semi_sync_method = \"diloco\""),
    Requirement(tuple(f"validation.{k}" for k in _VALIDATION_OPTIONS), "validation.enable",
                lambda c: c.validation.enable, "validation.enable = true"),
    Requirement(tuple(f"downstream_eval.{k}" for k in _DOWNSTREAM_OPTIONS), "downstream_eval.enable",
                lambda c: c.downstream_eval.enable, "downstream_eval.enable = true"),
    Requirement(tuple(f"checkpoint.{k}" for k in _CHECKPOINT_OPTIONS), "checkpoint.enable",
                lambda c: c.checkpoint.enable, "checkpoint.enable = true (nothing is saved or resumed without it)"),
    Requirement(("checkpoint.export_dtype",), "checkpoint.last_save_model_only",
                lambda c: c.checkpoint.last_save_model_only or c.checkpoint.last_save_in_hf,
                "checkpoint.last_save_model_only = true or checkpoint.last_save_in_hf = true (only final exports "
                "are cast)"),
    Requirement(tuple(f"data.{k}" for k in _FILTER_OPTIONS), "data.instance_filter",
                lambda c: c.data.instance_filter, "data.instance_filter = true"),
    Requirement(("checkpoint.initial_load_model_only", "checkpoint.reset_trainer_state",
                 "lr_scheduler.start_lr_from_checkpoint"), "checkpoint.initial_load_path",
                lambda c: bool(c.checkpoint.initial_load_path), "checkpoint.initial_load_path"),
    Requirement(tuple(f"data.{k}" for k in _MEMMAP_OPTIONS), "data.dataset",
                lambda c: c.data.dataset == "memmap", 'data.dataset = "memmap"'),
    Requirement(("data.dataset_path", "data.dataset_text_field", "data.shuffle_documents"),
                "data.dataset", lambda c: c.data.dataset != "memmap",
                "a text dataset (memmap data is read from data.memmap_paths in its own order)"),
    Requirement(("data.document_rope_restart",), "data.document_masking",
                lambda c: c.data.document_masking, "data.document_masking = true"),
    Requirement(("training.spike_guard_window",), "training.spike_guard_sigma",
                lambda c: c.training.spike_guard_sigma > 0, "training.spike_guard_sigma > 0"),
    Requirement(("lr_scheduler.grad_clip_warmup_steps", "lr_scheduler.grad_clip_warmup_factor"), "training.max_norm",
                lambda c: c.training.max_norm > 0, "training.max_norm > 0 (gradient clipping on)"),
    Requirement(("optimizer.decay_embeddings", "optimizer.decay_norm_and_bias"), "optimizer.weight_decay",
                lambda c: c.optimizer.weight_decay > 0, "optimizer.weight_decay > 0"),
    Requirement(tuple(f"optimizer.muon_{k}" for k in _MUON_OPTIONS), "optimizer.name",
                lambda c: c.optimizer.name == "Muon", 'optimizer.name = "Muon"'),
    Requirement(("training.loss_chunk_size",), "parallelism.disable_loss_parallel",
                lambda c: c.parallelism.tensor_parallel_degree == 1 or c.parallelism.disable_loss_parallel,
                "parallelism.disable_loss_parallel = true under tensor parallel (loss parallel already keeps "
                "the logits vocab-sharded)"),
    Requirement(tuple(f"parallelism.{k}" for k in _PIPELINE_OPTIONS), "parallelism.pipeline_parallel_degree",
                lambda c: c.parallelism.pipeline_parallel_degree > 1, "parallelism.pipeline_parallel_degree > 1"),
    Requirement(("parallelism.pipeline_parallel_schedule_csv",), "parallelism.pipeline_parallel_schedule",
                lambda c: c.parallelism.pipeline_parallel_schedule == "CSV",
                'parallelism.pipeline_parallel_schedule = "CSV"'),
    Requirement(("parallelism.context_parallel_rotate_method",), "parallelism.context_parallel_degree",
                lambda c: c.parallelism.context_parallel_degree > 1, "parallelism.context_parallel_degree > 1"),
    Requirement(("parallelism.disable_loss_parallel", "parallelism.enable_async_tensor_parallel"),
                "parallelism.tensor_parallel_degree", lambda c: c.parallelism.tensor_parallel_degree > 1,
                "parallelism.tensor_parallel_degree > 1"),
    Requirement(("float8.recipe_name", "float8.enable_fsdp_float8_all_gather",
                 "float8.precompute_float8_dynamic_scale_for_fsdp", "float8.filter_fqns"), "model.converters",
                lambda c: "float8" in c.model.converters, 'model.converters = ["float8"]'),
    Requirement(("activation_checkpoint.selective_ac_option",), "activation_checkpoint.mode",
                lambda c: c.activation_checkpoint.mode == "selective", 'activation_checkpoint.mode = "selective"'),
    Requirement(("compile.components",), "compile.enable", lambda c: c.compile.enable, "compile.enable = true"),
    Requirement(("metrics.save_tb_folder",), "metrics.enable_tensorboard", lambda c: c.metrics.enable_tensorboard,
                "metrics.enable_tensorboard = true"),
    Requirement(tuple(f"metrics.{k}" for k in _WANDB_OPTIONS), "metrics.enable_wandb",
                lambda c: c.metrics.enable_wandb, "metrics.enable_wandb = true"),
    Requirement(("profiling.save_traces_folder",), "profiling.enable_profiling", lambda c: c.profiling.enable_profiling,
                "profiling.enable_profiling = true"),
    Requirement(("profiling.profiler_active", "profiling.profiler_warmup"), "profiling.enable_profiling",
                lambda c: c.profiling.enable_profiling, "profiling.enable_profiling = true"),
    Requirement(("profiling.profile_freq",), "profiling.enable_profiling",
                lambda c: c.profiling.enable_profiling or c.profiling.enable_memory_snapshot,
                "profiling.enable_profiling or profiling.enable_memory_snapshot = true"),
    Requirement(("profiling.save_memory_snapshot_folder",), "profiling.enable_memory_snapshot",
                lambda c: c.profiling.enable_memory_snapshot, "profiling.enable_memory_snapshot = true"),
)


def _unmet(cfg: JobConfig):
    defaults = type(cfg)()
    for req in REQUIREMENTS:
        if req.met(cfg):
            continue
        for key in req.keys:
            section, name = key.split(".")
            # A key set to its default changes nothing (e.g. a config printed by --job.print_config).
            if key in cfg.set_by and getattr(getattr(cfg, section), name) != getattr(getattr(defaults, section), name):
                yield key, req


def check_effects(cfg: JobConfig) -> None:
    """Raise for the first option set by the user that would do nothing (see the module doc)."""
    for key, req in _unmet(cfg):
        if cfg.set_by[key] == "cli" or (req.switch not in cfg.set_by and key not in cfg.torchtitan_keys):
            where = "the command line" if cfg.set_by[key] == "cli" else cfg.set_by[key]
            raise ConfigError(f"{key} (set in {where}) has no effect here: it needs {req.needs}; set that or "
                              f"remove {key}")


def effect_notes(cfg: JobConfig) -> list[str]:
    """The options from a config file whose switch was set off explicitly (logged, not errors)."""
    return [f"{key} (from {cfg.set_by[key]}) has no effect: {req.switch} is off"
            for key, req in _unmet(cfg)]
