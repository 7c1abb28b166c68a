"""The life of a job: config -> mesh -> train spec -> data -> model -> parallelize -> loop.

Run through `run_train.sh` (torchrun) or `python -m torchtitan.train --job.config_file ...`.
docs/architecture.md walks through this file and the layers below it.
"""
from __future__ import annotations

import functools
import gc
import logging
import os
import sys
import time

import torch

from torchtitan.checkpoint import CheckpointManager, ModelInfo, ModelWrapper
from torchtitan.components.dataloader import build_dataloader
from torchtitan.components.float8 import convert_to_float8, precompute_float8_scales
from torchtitan.components.loss import build_loss_fn, fuse_output_into_loss
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.metrics import MetricsLogger
from torchtitan.components.optimizer import build_optimizers
from torchtitan.components.profiling import Profiler
from torchtitan.components.tokenizer import build_tokenizer, check_vocab_fits
from torchtitan.config import JobConfig
from torchtitan.config.effects import effect_notes
from torchtitan.distributed.fault_tolerance import ReplicaGroups
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.pipeline import build_pipeline
from torchtitan.distributed.utils import init_distributed, set_determinism, set_pg_timeout
from torchtitan.models import get_train_spec
from torchtitan.models.common.parallelize import parallelize_decoder
from torchtitan.tools.device import detect_device_type, local_device
from torchtitan.tools.errors import EXIT_USER_ERROR, UserError
from torchtitan.tools.logging import init_logging
from torchtitan.trainer.balance import ExpertBalance
from torchtitan.trainer.dry_run import dry_run, rank_memory_line
from torchtitan.trainer.guards import NonFiniteGuard, SpikeGuard
from torchtitan.trainer.preflight import autocast_dtype, build_model_args, check_job, compile_loss_enabled, layout_notes
from torchtitan.trainer.state import TrainState
from torchtitan.trainer.step import ModelRunner, global_mean_loss, train_step
from torchtitan.trainer.validate import Validator

logger = logging.getLogger("torchtitan")
DEFAULT_TOKENIZER = os.path.join(os.path.dirname(__file__), "assets", "tokenizer")


def train(cfg: JobConfig) -> list[dict]:
    device_type, t = detect_device_type(), cfg.training
    fake = cfg.comm.mode == "fake_backend"
    rank, world = init_distributed(device_type, cfg.comm.init_timeout_seconds, fake=fake)
    device = torch.device("meta") if fake else local_device(device_type)
    dims = ParallelDims.from_config(cfg.parallelism, world)
    if world > 1 or fake:
        dims.build_mesh("cpu" if fake else device_type)
    spec = get_train_spec(cfg.model.name)
    model_args = build_model_args(spec, cfg, device_type)
    float8 = "float8" in cfg.model.converters
    parallelize = functools.partial(
        parallelize_decoder, dims=dims, parallelism=cfg.parallelism, training=t,
        activation_checkpoint=cfg.activation_checkpoint, compile=cfg.compile, device_type=device_type,
        convert=functools.partial(convert_to_float8, cfg=cfg.float8) if float8 else None)
    if fake:
        return dry_run(spec.build_meta_model(model_args), dims, cfg, parallelize)

    tokenizer_path = cfg.model.tokenizer_path or DEFAULT_TOKENIZER
    tokenizer = build_tokenizer(tokenizer_path, cfg.model.tokenizer_backend)
    check_vocab_fits(tokenizer, model_args.vocab_size, tokenizer_path)
    # Fault tolerance: this job is one replica group of several (docs/fault_tolerance.md); each logs to its folder.
    ft = cfg.fault_tolerance
    log_folder = os.path.join(cfg.job.dump_folder, f"replica_{ft.replica_id}") if ft.enable else cfg.job.dump_folder
    replicas = ReplicaGroups(ft, dims, device, log_folder) if ft.enable else None
    groups = ft.group_size if ft.enable else 1
    accumulation = 1 if t.global_batch_size <= 0 else t.global_batch_size // (t.local_batch_size * dims.dp * groups)
    dataloader = build_dataloader(t, tokenizer, dims.local_rank("dp"), dims.dp, cfg.job.dump_folder,
                                  replicas=replicas, accumulation=accumulation)

    seed = t.seed if t.seed is not None else 0
    set_determinism(seed, t.deterministic)
    model = spec.build_meta_model(model_args)
    num_params, flops_per_token = model.num_params(), model.flops_per_token(t.seq_len)
    active_params = model.num_params(active=True)
    compile_loss = compile_loss_enabled(cfg, dims.tp)
    if cfg.compile.enable and "loss" in cfg.compile.components and not compile_loss:
        logger.info("compile: the loss stays eager under tensor-parallel loss_parallel (see trainer/preflight.py)")
    loss_fn = build_loss_fn(t, compile_loss)
    if t.fused_output_loss:
        fuse_output_into_loss(model)  # the loss applies the output weight, chunk by chunk
    pipeline = None
    if dims.pp_enabled:
        pipeline = build_pipeline(model, dims=dims, parallelism=cfg.parallelism,
                                  local_batch_size=t.local_batch_size, device=device,
                                  parallelize=parallelize, loss_fn=loss_fn)
    parts = pipeline.parts if pipeline is not None else [parallelize(model)]
    for part in parts:
        part.to_empty(device=device)
        part.init_weights(buffer_device=device, seed=seed)  # the same weights on every layout
        part.train()
    if t.fused_output_loss and any(part.output is not None for part in parts):
        loss_fn.head = next(part.output for part in parts if part.output is not None)
    if cfg.memory_estimation.enabled:
        logger.info(rank_memory_line(parts, dims, cfg))

    optimizers = build_optimizers(parts, cfg.optimizer, device_type)
    lr_schedulers = build_lr_schedulers(optimizers, cfg.lr_scheduler, t.steps)
    state = TrainState()
    spike_guard = SpikeGuard(t.spike_guard_sigma, t.spike_guard_window, device) if t.spike_guard_sigma > 0 else None
    checkpoint = CheckpointManager(
        cfg.checkpoint, cfg.job.dump_folder,
        {"model": ModelWrapper(parts), "optimizer": optimizers, "lr_scheduler": lr_schedulers,
         "dataloader": dataloader, "train_state": state, **({"spike_guard": spike_guard} if spike_guard else {})},
        t.steps, model=ModelInfo(cfg.model.name, cfg.model.flavor, model_args))
    if cfg.checkpoint.create_seed_checkpoint:
        checkpoint.save_seed()
        return []
    if replicas is not None:
        # What a group (re)joining live ones receives from them; DiLoCo (semi-synchronous) wraps the parts here.
        replicas.register_state(checkpoint.states, model_parts=parts, optimizers=optimizers)
    if replicas is None or not replicas.join():  # joined live groups: their state, no checkpoint read
        state.step = checkpoint.load()
        if replicas is not None:
            replicas.set_step(state.step)

    runner = ModelRunner(parts, loss_fn, device, pipeline, cp_mesh=dims.mesh["cp"] if dims.cp_enabled else None,
                         loss_parallel=dims.tp_enabled and not cfg.parallelism.disable_loss_parallel,
                         autocast=autocast_dtype(cfg, dims, device_type),
                         document_eos_id=tokenizer.eos_id if t.document_masking else None,
                         document_rope_restart=t.document_rope_restart)
    after_update = functools.partial(precompute_float8_scales, parts, cfg.float8) if float8 else None
    global_tokens = t.local_batch_size * dims.dp * accumulation * t.seq_len  # per replica group present
    balance = ExpertBalance(parts, cfg.moe, dims, global_tokens, device, pipeline) if model_args.moe else None
    metrics = MetricsLogger(cfg.metrics, log_folder, rank, device_type, flops_per_token, world,
                            t.steps, write_files=(rank == 0))
    active = f" ({active_params:,} active per token)" if active_params != num_params else ""
    logger.info(f"{cfg.model.name} {cfg.model.flavor}: {num_params:,} params{active}, {dims.describe()}, "
                f"device {device_type}, steps {state.step + 1}..{t.steps}")
    for note in effect_notes(cfg) + layout_notes(cfg, dims, device_type):
        logger.warning(note)

    validator = Validator(cfg.validation, t, tokenizer, dims, t.steps) if cfg.validation.enable else None
    profiler = Profiler(cfg.profiling, cfg.job.dump_folder, rank, device_type, state.step)
    guard = NonFiniteGuard()
    gc.disable()  # collect on a schedule, so no rank stalls at a random step
    data_iter = iter(dataloader)
    records = []
    while state.step < t.steps:
        if replicas is not None:
            replicas.start_step()  # this step's quorum (DiLoCo: at syncs); a group that rejoins is healed there
        state.step += 1
        if state.step % t.gc_freq == 0:
            gc.collect(1)
        t0 = time.perf_counter()
        batches = [(batch["input"], labels) for batch, labels in (next(data_iter) for _ in range(accumulation))]
        metrics.add_data_time(time.perf_counter() - t0)
        out = train_step(runner, batches, dims=dims, optimizers=optimizers, lr_schedulers=lr_schedulers,
                         guard=guard, step=state.step, max_norm=t.max_norm, after_update=after_update,
                         spike_guard=spike_guard, balance=balance, replicas=replicas)
        if not out.committed:  # a replica group failed mid-step: nothing was updated; redo it with the next quorum
            state.step -= 1
            continue
        step_tokens = global_tokens * (replicas.present if replicas is not None else 1)
        metrics.add_step(step_tokens)
        state.tokens_seen += step_tokens
        profiler.step(state.step)
        if metrics.should_log(state.step):
            loss = global_mean_loss(out, dims)
            guard.check()
            extra = {"skipped_steps": int(spike_guard.skipped)} if spike_guard else {}
            extra.update({"replicas": replicas.present} if replicas is not None else {})
            extra.update(balance.metrics() if balance is not None else {})
            records.append(metrics.log(state.step, loss, float(out.grad_norm), lr_schedulers.get_last_lr(), extra))
        if validator is not None and validator.due(state.step):
            guard.check()
            v = validator.run(runner)
            records.append(metrics.log_validation(state.step, v.loss, v.perplexity, v.tokens, v.seconds))
        last = state.step == t.steps
        if checkpoint.should_save(state.step, last) and (replicas is None or replicas.saves_checkpoints):
            guard.check()  # never write a checkpoint of weights that a non-finite step reached
            checkpoint.save(state.step, last=last)
        if state.step == 1:
            set_pg_timeout(cfg.comm.train_timeout_seconds)
    checkpoint.close()
    if replicas is not None:
        replicas.close()
    metrics.close()
    profiler.close()
    gc.enable()  # train() may be called again in this process (tests/integration/parity_driver.py)
    logger.info("training finished")
    return records


def main(argv: list[str] | None = None) -> int:
    """User errors (config, files, data, divergence) are one line and a non-zero exit; bugs keep their traceback."""
    init_logging()
    cfg = check_job(argv, int(os.environ.get("WORLD_SIZE", "1")))
    if isinstance(cfg, int):
        return cfg
    try:
        train(cfg)
    except UserError as e:
        logger.error(f"error: {e}")
        return EXIT_USER_ERROR
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
