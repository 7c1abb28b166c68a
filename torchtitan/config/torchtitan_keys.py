"""torchtitan 0.2.x job-config keys that are not ours: each is an alias of one of ours, or a one-line error.

torchtitan 0.3 dropped TOML job configs; users still hold 0.2.x files. Every key of torchtitan 0.2.2's job
config (and the older names its 0.1/0.2 train configs still carry) is listed here unless it has the same name
and meaning as ours. Nothing is ignored silently:
  Alias(key)        the same setting under our name (with a value conversion where the spellings differ);
  Unsupported(d, w) accepted at torchtitan's default `d`, which asks for nothing we do not do; any other value
                    is an error saying why and what to use instead (w);
  NoEffect(w)       accepted with any value, because it changes nothing about training here; the run logs w.
Nested tables (`[quantize.linear.float8]`, `[training.dataloader]`) are flattened to dotted keys. A setting
that came in under a torchtitan name and acts only behind a switch that is off (`[quantize.linear.float8]`
without the float8 converter) is logged, not refused (trainer/effects.py): torchtitan's configs keep such
settings for features they leave off, and its loader took them.
docs/config.md has the table for users.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchtitan.tools.errors import ConfigError


@dataclass(frozen=True)
class Alias:
    key: str
    convert: Callable[[Any], Any] | None = None
    note: str = ""  # logged when the conversion changed the value


@dataclass(frozen=True)
class Unsupported:
    default: Any
    why: str


@dataclass(frozen=True)
class NoEffect:
    why: str


def _dataset(value):
    # torchtitan's c4_test is a small sample of C4 bundled with its tests; ours is the bundled offline corpus.
    return "pydoc" if value == "c4_test" else value


def _converters(value):
    # torchtitan 0.2.2 registers the float8 converter as quantize.linear.float8; ours is float8.
    names = [n.strip() for n in value.split(",") if n.strip()] if isinstance(value, str) else list(value)
    return ["float8" if name == "quantize.linear.float8" else name for name in names]


def _semi_sync(value):
    if value in ("sync", "diloco"):
        return value
    raise ConfigError(f"fault_tolerance.semi_sync_method = {value!r} is not available; use \"sync\" or \"diloco\" "
                      f"(diloco with fault_tolerance.outer_lr = 1.0 and outer_momentum = 0 is local SGD)")


def _ms_to_seconds(value):
    return max(1, -(-int(value) // 1000))


_SPLIT = "use parallelism.pipeline_parallel_split_points or pipeline_parallel_layers_per_stage"
_WORKERS = "the dataloader runs in the training process (tokenization is cheap next to a step; docs/datasets.md)"
_AC = "activation_checkpoint.mode is none, full or selective here"
_MX = "MX formats are not available; use the float8 converter (model.converters = [\"float8\"])"

TORCHTITAN_KEYS: dict[str, Alias | Unsupported | NoEffect] = {
    # [job]
    "job.print_args": Alias("job.print_args"),
    "job.use_for_integration_test": NoEffect("it marks configs for torchtitan's own CI"),
    "job.save_config_file": Unsupported("", "use --job.print_config > file.toml (it shows where each value came "
                                            "from)"),
    "job.custom_config_module": Unsupported("", "config sections are fixed here; extend a file with `extends`"),
    # [metrics]
    "metrics.disable_color_printing": NoEffect("log lines have no colors here"),
    "metrics.save_for_all_ranks": Unsupported(False, "rank 0 writes the metrics; LOG_RANK=0,1 shows other ranks' "
                                                     "log lines"),
    # [model]
    "model.hf_assets_path": Alias("model.tokenizer_path"),
    "model.print_after_conversion": Unsupported(False, "the model is not printed; --job.print_args logs the config"),
    "model.converters": Alias("model.converters", _converters),
    # [optimizer] [lr_scheduler]
    "optimizer.early_step_in_backward": Unsupported(False, "the optimizer steps after backward (and clipping)"),
    # [training]
    "training.dataset": Alias("data.dataset", _dataset, "training.dataset = \"c4_test\" (torchtitan's test sample) "
                                                        "reads the bundled offline corpus (pydoc)"),
    "training.dtype": Unsupported("float32", "parameters stay float32; training.mixed_precision_param sets the "
                                             "compute dtype"),
    "training.gc_debug": Unsupported(False, "garbage collection runs every training.gc_freq steps, without debug "
                                            "output"),
    "training.dataloader.num_workers": Unsupported(0, _WORKERS),
    "training.dataloader.persistent_workers": Unsupported(False, _WORKERS),
    "training.dataloader.pin_memory": Unsupported(False, _WORKERS),
    "training.dataloader.prefetch_factor": Unsupported(None, _WORKERS),
    # [parallelism]
    "parallelism.module_fqns_per_model_part": Unsupported(None, _SPLIT),
    "parallelism.pipeline_parallel_first_stage_less_layers": Unsupported(1, _SPLIT + " (layers are split evenly)"),
    "parallelism.pipeline_parallel_last_stage_less_layers": Unsupported(1, _SPLIT + " (layers are split evenly)"),
    "parallelism.pipeline_parallel_expert_parallel_overlap": NoEffect("pipeline stages do not overlap expert "
                                                                      "all-to-alls here"),
    "parallelism.context_parallel_load_balancer": Unsupported("headtail", "context parallel always balances the "
                                                                          "causal work head-tail"),
    "parallelism.expert_tensor_parallel_degree": Unsupported(1, "experts are not tensor-parallel here; use "
                                                                "parallelism.expert_parallel_degree"),
    "parallelism.expert_parallel_comm_backend": Unsupported("standard", "experts use torch all-to-all"),
    # [checkpoint]
    "checkpoint.enable_ft_dataloader_checkpoints": Unsupported(True, "the dataloader is always checkpointed"),
    "checkpoint.initial_load_in_hf": Unsupported(False, "set checkpoint.initial_load_path to the HF folder: it is "
                                                        "read as DCP or HF safetensors by what it holds"),
    "checkpoint.initial_load_in_hf_quantized": Unsupported(False, "quantized HF checkpoints are not read"),
    "checkpoint.load_only": Unsupported(False, "scripts/generate.py and scripts/evaluate.py use a checkpoint "
                                               "without training"),
    # [activation_checkpoint]
    "activation_checkpoint.per_op_sac_force_recompute_mm_shapes_by_fqns": NoEffect("selective AC saves every "
                                                                                   "matmul output ('op')"),
    "activation_checkpoint.early_stop": Unsupported(False, _AC),
    "activation_checkpoint.memory_budget": NoEffect(_AC + " (memory_budget mode is not available)"),
    "activation_checkpoint.visualize_memory_budget_pareto": Unsupported(False, _AC),
    "activation_checkpoint.preserve_rng_state": Unsupported(True, "the model has no dropout; RNG state is kept"),
    "activation_checkpoint.determinism_check": Unsupported("default", _AC),
    "activation_checkpoint.debug": Unsupported(False, _AC),
    # [compile]
    "compile.backend": Unsupported("inductor", "blocks compile with inductor"),
    # [quantize.*]
    "quantize.linear.float8.recipe_name": Alias("float8.recipe_name"),
    "quantize.linear.float8.enable_fsdp_float8_all_gather": Alias("float8.enable_fsdp_float8_all_gather"),
    "quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp":
        Alias("float8.precompute_float8_dynamic_scale_for_fsdp"),
    "quantize.linear.float8.filter_fqns": Alias("float8.filter_fqns"),
    "quantize.linear.float8.emulate": Unsupported(False, "float8 runs on GPUs with float8 support only"),
    # Settings of converters we do not have: they act only with the converter, which model.converters refuses by
    # name, so without it they change nothing (torchtitan's configs keep them with the converter commented out).
    "quantize.linear.mx.mxfp8_dim1_cast_kernel_choice": NoEffect(_MX),
    "quantize.linear.mx.recipe_name": NoEffect(_MX),
    "quantize.linear.mx.filter_fqns": NoEffect(_MX),
    "quantize.grouped_mm.float8.fqns": NoEffect("experts run in bf16 grouped matmuls (no float8 grouped-mm "
                                                "converter)"),
    "quantize.grouped_mm.mx.recipe_name": NoEffect(_MX),
    "quantize.grouped_mm.mx.fqns": NoEffect(_MX),
    # [comm]
    "comm.trace_buf_size": NoEffect("set TORCH_NCCL_TRACE_BUFFER_SIZE for NCCL's flight recorder"),
    "comm.save_traces_folder": NoEffect("NCCL flight-recorder dumps follow TORCH_NCCL_DEBUG_INFO_TEMP_FILE"),
    "comm.save_traces_file_prefix": NoEffect("NCCL flight-recorder dumps follow TORCH_NCCL_DEBUG_INFO_TEMP_FILE"),
    # [memory_estimation]
    "memory_estimation.enable": Alias("memory_estimation.enabled"),
    "memory_estimation.disable_fake_mode": Unsupported(False, "memory is counted from the sharded model; "
                                                              "COMM_MODE=fake_backend is the dry run"),
    # [fault_tolerance]
    "fault_tolerance.process_group": NoEffect("replica groups talk over NCCL on GPUs and gloo on CPUs"),
    "fault_tolerance.process_group_timeout_ms": Alias("fault_tolerance.timeout_seconds", _ms_to_seconds),
    "fault_tolerance.semi_sync_method": Alias("fault_tolerance.semi_sync_method", _semi_sync),
    # [experimental]
    "experimental.custom_import": Unsupported("", "models are the families of torchtitan/models (a flavor table "
                                                  "each)"),
    "experimental.custom_args_module": Unsupported("", "config sections are fixed here"),
    # [validation]
    "validation.enabled": Alias("validation.enable"),
    "validation.dataloader.num_workers": Unsupported(0, _WORKERS),
    "validation.dataloader.persistent_workers": Unsupported(False, _WORKERS),
    "validation.dataloader.pin_memory": Unsupported(False, _WORKERS),
    "validation.dataloader.prefetch_factor": Unsupported(None, _WORKERS),
    # [debug]
    "debug.seed": Alias("training.seed"),
    "debug.deterministic": Alias("training.deterministic"),
    "debug.deterministic_warn_only": Unsupported(False, "training.deterministic makes nondeterministic ops errors"),
    "debug.moe_force_load_balance": Unsupported(False, "routing is learned (moe.load_balance_loss_weight)"),
}


def _same(raw, default, from_cli: bool) -> bool:
    if from_cli and isinstance(raw, str) and not isinstance(default, str):
        return raw.lower() == str(default).lower() or (default is None and raw.lower() in ("none", "null", ""))
    return raw == default


def translate(key: str, raw: Any, from_cli: bool) -> tuple[str | None, Any, str]:
    """(our key, value, note) for a torchtitan key; our key None: accepted and nothing to set."""
    entry = TORCHTITAN_KEYS[key]
    if isinstance(entry, Alias):
        value = entry.convert(raw) if entry.convert is not None else raw
        note = entry.note if entry.note and value != raw else ""
        return entry.key, value, note
    if isinstance(entry, NoEffect):
        return None, raw, f"{key} (torchtitan) has no effect here: {entry.why}"
    if _same(raw, entry.default, from_cli):
        return None, raw, ""
    raise ConfigError(f"{key} = {raw!r} (a torchtitan option) is not supported here: {entry.why}")


def flatten(table: dict, prefix: str) -> list[tuple[str, Any]]:
    """(dotted key, value) of a TOML table; nested tables (torchtitan's) become dotted keys."""
    out = []
    for name, value in table.items():
        key = f"{prefix}.{name}"
        out.extend(flatten(value, key) if isinstance(value, dict) else [(key, value)])
    return out
