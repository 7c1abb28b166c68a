"""Key sets of torchtitan 0.2.2's own Llama 3 train configs (torchtitan/models/llama3/train_configs/*.toml at
its v0.2.2 release, 2026-02-20), as tables of values: what a user brings, without the files' text."""

DEBUG_MODEL = {'job': {'dump_folder': './outputs', 'description': 'Llama 3 debug training', 'print_config': False},
 'profiling': {'enable_profiling': False,
               'save_traces_folder': 'profile_trace',
               'profile_freq': 10,
               'enable_memory_snapshot': False,
               'save_memory_snapshot_folder': 'memory_snapshot'},
 'metrics': {'log_freq': 1,
             'disable_color_printing': False,
             'enable_tensorboard': False,
             'save_tb_folder': 'tb',
             'enable_wandb': False},
 'model': {'name': 'llama3', 'flavor': 'debugmodel', 'hf_assets_path': './tests/assets/tokenizer'},
 'optimizer': {'name': 'AdamW', 'lr': 0.0008, 'eps': 1e-08},
 'lr_scheduler': {'warmup_steps': 2, 'decay_ratio': 0.8, 'decay_type': 'linear', 'min_lr_factor': 0.0},
 'training': {'local_batch_size': 8, 'seq_len': 2048, 'max_norm': 1.0, 'steps': 10, 'dataset': 'c4_test'},
 'parallelism': {'data_parallel_replicate_degree': 1,
                 'data_parallel_shard_degree': -1,
                 'fsdp_reshard_after_forward': 'default',
                 'tensor_parallel_degree': 1,
                 'enable_async_tensor_parallel': False,
                 'pipeline_parallel_degree': 1,
                 'pipeline_parallel_schedule': 'Interleaved1F1B',
                 'context_parallel_degree': 1},
 'checkpoint': {'enable': False,
                'folder': 'checkpoint',
                'interval': 10,
                'last_save_model_only': False,
                'export_dtype': 'float32',
                'async_mode': 'disabled'},
 'activation_checkpoint': {'mode': 'selective', 'selective_ac_option': '2'},
 'compile': {'enable': False, 'components': ['model', 'loss']},
 'quantize': {'linear': {'float8': {'enable_fsdp_float8_all_gather': False,
                                    'precompute_float8_dynamic_scale_for_fsdp': False,
                                    'filter_fqns': ['output']}}},
 'validation': {'enable': False, 'dataset': 'c4_validation', 'freq': 5, 'steps': 10}}

LLAMA3_8B = {'job': {'dump_folder': './outputs', 'description': 'Llama 3 8B training'},
 'profiling': {'enable_profiling': True, 'save_traces_folder': 'profile_trace', 'profile_freq': 100},
 'metrics': {'log_freq': 10, 'enable_tensorboard': True, 'save_tb_folder': 'tb'},
 'model': {'name': 'llama3', 'flavor': '8B', 'hf_assets_path': './assets/hf/Llama-3.1-8B'},
 'optimizer': {'name': 'AdamW', 'lr': 0.0003, 'eps': 1e-08},
 'lr_scheduler': {'warmup_steps': 200},
 'training': {'local_batch_size': 1, 'seq_len': 8192, 'max_norm': 1.0, 'steps': 1000, 'dataset': 'c4'},
 'parallelism': {'data_parallel_replicate_degree': 1,
                 'data_parallel_shard_degree': -1,
                 'tensor_parallel_degree': 1,
                 'pipeline_parallel_degree': 1,
                 'context_parallel_degree': 1},
 'checkpoint': {'enable': False,
                'folder': 'checkpoint',
                'interval': 500,
                'last_save_model_only': True,
                'export_dtype': 'float32',
                'async_mode': 'disabled'},
 'compile': {'enable': False, 'components': ['model', 'loss']},
 'activation_checkpoint': {'mode': 'selective', 'selective_ac_option': 'op'},
 'quantize': {'linear': {'float8': {'enable_fsdp_float8_all_gather': False,
                                    'precompute_float8_dynamic_scale_for_fsdp': False,
                                    'filter_fqns': ['output']}}},
 'validation': {'enable': False, 'dataset': 'c4_validation', 'freq': 500, 'steps': 1200}}

LLAMA3_70B = {'job': {'dump_folder': './outputs', 'description': 'Llama 3 70B training'},
 'profiling': {'enable_profiling': True, 'save_traces_folder': 'profile_trace', 'profile_freq': 100},
 'metrics': {'log_freq': 10, 'enable_tensorboard': True, 'save_tb_folder': 'tb'},
 'model': {'name': 'llama3', 'flavor': '70B', 'hf_assets_path': './assets/hf/Llama-3.1-70B'},
 'optimizer': {'name': 'AdamW', 'lr': 0.00015, 'eps': 1e-08},
 'lr_scheduler': {'warmup_steps': 200},
 'training': {'local_batch_size': 8, 'seq_len': 8192, 'max_norm': 1.0, 'steps': 1000, 'dataset': 'c4'},
 'parallelism': {'data_parallel_replicate_degree': 1,
                 'data_parallel_shard_degree': -1,
                 'tensor_parallel_degree': 8,
                 'pipeline_parallel_degree': 1,
                 'context_parallel_degree': 1},
 'checkpoint': {'enable': False,
                'folder': 'checkpoint',
                'interval': 500,
                'last_save_model_only': True,
                'export_dtype': 'float32',
                'async_mode': 'disabled'},
 'activation_checkpoint': {'mode': 'full'},
 'compile': {'enable': False, 'components': ['model', 'loss']},
 'quantize': {'linear': {'float8': {'enable_fsdp_float8_all_gather': False,
                                    'precompute_float8_dynamic_scale_for_fsdp': False,
                                    'filter_fqns': ['output']}}},
 'validation': {'enable': False, 'dataset': 'c4_validation', 'freq': 500, 'steps': 1200}}

LLAMA3_405B = {'job': {'dump_folder': './outputs', 'description': 'Llama 3 405B training'},
 'profiling': {'enable_profiling': True, 'save_traces_folder': 'profile_trace', 'profile_freq': 100},
 'metrics': {'log_freq': 10, 'enable_tensorboard': True, 'save_tb_folder': 'tb'},
 'model': {'name': 'llama3',
           'flavor': '405B',
           'hf_assets_path': './assets/hf/Llama-3.1-405B',
           'converters': ['float8']},
 'optimizer': {'name': 'AdamW', 'lr': 8e-05, 'eps': 1e-08},
 'lr_scheduler': {'warmup_steps': 600},
 'training': {'local_batch_size': 2, 'seq_len': 8192, 'max_norm': 1.0, 'steps': 3000, 'dataset': 'c4'},
 'parallelism': {'data_parallel_replicate_degree': 1,
                 'data_parallel_shard_degree': -1,
                 'tensor_parallel_degree': 8,
                 'enable_async_tensor_parallel': True,
                 'pipeline_parallel_degree': 1,
                 'context_parallel_degree': 1},
 'checkpoint': {'enable': False,
                'folder': 'checkpoint',
                'interval': 500,
                'last_save_model_only': True,
                'export_dtype': 'float32',
                'async_mode': 'disabled'},
 'activation_checkpoint': {'mode': 'full'},
 'compile': {'enable': True, 'components': ['model', 'loss']},
 'quantize': {'linear': {'float8': {'enable_fsdp_float8_all_gather': True,
                                    'precompute_float8_dynamic_scale_for_fsdp': True,
                                    'filter_fqns': ['output']}}},
 'validation': {'enable': False, 'dataset': 'c4_validation', 'freq': 500, 'steps': 1200}}

# Every key of torchtitan 0.2.2's JobConfig (torchtitan/config/job_config.py), nested tables as dotted keys.
JOB_CONFIG_KEYS = (
    "job.config_file", "job.dump_folder", "job.description", "job.print_config", "job.save_config_file",
    "job.custom_config_module", "profiling.enable_profiling", "profiling.save_traces_folder",
    "profiling.profile_freq", "profiling.profiler_active", "profiling.profiler_warmup",
    "profiling.enable_memory_snapshot", "profiling.save_memory_snapshot_folder", "metrics.log_freq",
    "metrics.enable_tensorboard", "metrics.disable_color_printing", "metrics.save_tb_folder",
    "metrics.save_for_all_ranks", "metrics.enable_wandb", "model.name", "model.flavor", "model.hf_assets_path",
    "model.tokenizer_path", "model.converters", "model.print_after_conversion", "optimizer.name", "optimizer.lr",
    "optimizer.beta1", "optimizer.beta2", "optimizer.eps", "optimizer.weight_decay", "optimizer.implementation",
    "optimizer.early_step_in_backward", "lr_scheduler.warmup_steps", "lr_scheduler.total_steps",
    "lr_scheduler.decay_ratio", "lr_scheduler.decay_type", "lr_scheduler.min_lr_factor", "training.dataset",
    "training.dataset_path", "training.local_batch_size", "training.global_batch_size", "training.seq_len",
    "training.max_norm", "training.steps", "training.enable_cpu_offload", "training.dtype",
    "training.mixed_precision_param", "training.mixed_precision_reduce", "training.gc_freq", "training.gc_debug",
    "training.dataloader.num_workers", "training.dataloader.persistent_workers", "training.dataloader.pin_memory",
    "training.dataloader.prefetch_factor", "parallelism.data_parallel_replicate_degree",
    "parallelism.data_parallel_shard_degree", "parallelism.fsdp_reshard_after_forward",
    "parallelism.tensor_parallel_degree", "parallelism.disable_loss_parallel",
    "parallelism.enable_async_tensor_parallel", "parallelism.pipeline_parallel_degree",
    "parallelism.module_fqns_per_model_part", "parallelism.pipeline_parallel_first_stage_less_layers",
    "parallelism.pipeline_parallel_last_stage_less_layers", "parallelism.pipeline_parallel_layers_per_stage",
    "parallelism.pipeline_parallel_schedule", "parallelism.pipeline_parallel_schedule_csv",
    "parallelism.pipeline_parallel_microbatch_size", "parallelism.pipeline_parallel_expert_parallel_overlap",
    "parallelism.context_parallel_degree", "parallelism.context_parallel_load_balancer",
    "parallelism.context_parallel_rotate_method", "parallelism.expert_parallel_degree",
    "parallelism.expert_tensor_parallel_degree", "parallelism.expert_parallel_comm_backend", "checkpoint.enable",
    "checkpoint.enable_ft_dataloader_checkpoints", "checkpoint.folder", "checkpoint.interval",
    "checkpoint.initial_load_path", "checkpoint.initial_load_model_only", "checkpoint.initial_load_in_hf",
    "checkpoint.initial_load_in_hf_quantized", "checkpoint.last_save_model_only", "checkpoint.last_save_in_hf",
    "checkpoint.export_dtype", "checkpoint.async_mode", "checkpoint.keep_latest_k", "checkpoint.load_step",
    "checkpoint.exclude_from_loading", "checkpoint.enable_first_step_checkpoint", "checkpoint.create_seed_checkpoint",
    "checkpoint.load_only", "activation_checkpoint.mode", "activation_checkpoint.selective_ac_option",
    "activation_checkpoint.per_op_sac_force_recompute_mm_shapes_by_fqns", "activation_checkpoint.early_stop",
    "activation_checkpoint.memory_budget", "activation_checkpoint.visualize_memory_budget_pareto",
    "activation_checkpoint.preserve_rng_state", "activation_checkpoint.determinism_check",
    "activation_checkpoint.debug", "compile.enable", "compile.components", "compile.backend",
    "quantize.linear.float8.enable_fsdp_float8_all_gather",
    "quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp", "quantize.linear.float8.recipe_name",
    "quantize.linear.float8.filter_fqns", "quantize.linear.float8.emulate",
    "quantize.linear.mx.mxfp8_dim1_cast_kernel_choice", "quantize.linear.mx.recipe_name",
    "quantize.linear.mx.filter_fqns", "quantize.grouped_mm.float8.fqns", "quantize.grouped_mm.mx.recipe_name",
    "quantize.grouped_mm.mx.fqns", "comm.init_timeout_seconds", "comm.train_timeout_seconds", "comm.trace_buf_size",
    "comm.save_traces_folder", "comm.save_traces_file_prefix", "comm.mode", "memory_estimation.enable",
    "memory_estimation.disable_fake_mode", "fault_tolerance.enable", "fault_tolerance.process_group",
    "fault_tolerance.process_group_timeout_ms", "fault_tolerance.replica_id", "fault_tolerance.group_size",
    "fault_tolerance.min_replica_size", "fault_tolerance.semi_sync_method", "experimental.custom_import",
    "experimental.custom_args_module", "validation.enable", "validation.dataset", "validation.dataset_path",
    "validation.local_batch_size", "validation.seq_len", "validation.freq", "validation.steps",
    "validation.dataloader.num_workers", "validation.dataloader.persistent_workers",
    "validation.dataloader.pin_memory", "validation.dataloader.prefetch_factor", "debug.seed", "debug.deterministic",
    "debug.deterministic_warn_only", "debug.moe_force_load_balance",
)


def write_toml(table: dict, path) -> str:
    """Write a config table as TOML (nested tables as [a.b.c] headers); returns the path."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = []

    def emit(name: str, body: dict) -> None:
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {value(v)}" for k, v in body.items() if not isinstance(v, dict))
        lines.append("")
        for k, v in body.items():
            if isinstance(v, dict):
                emit(f"{name}.{k}", v)

    for name, body in table.items():
        emit(name, body)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return str(path)
