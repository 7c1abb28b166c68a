"""The life of a job: config -> mesh -> train spec -> data -> model -> parallelize -> loop.

Run through `run_train.sh` (torchrun) or `python -m torchtitan.train --job.config_file ...`.
"""
from __future__ import annotations

import gc
import logging
import os
import sys
import time

import torch

from torchtitan.components.checkpoint import CheckpointError, CheckpointManager, ModelWrapper, TrainState
from torchtitan.components.fused_loss import fuse_output_into_loss
from torchtitan.components.metrics import MetricsLogger
from torchtitan.components.tokenizer import check_vocab_fits
from torchtitan.config import ConfigError, JobConfig, load_config, to_toml
from torchtitan.distributed import utils as dist_utils
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.models import get_train_spec
from torchtitan.tools.device import detect_device_type, local_device
from torchtitan.tools.logging import init_logging
from torchtitan.tools.profiling import Profiler
from torchtitan.components.train_step import NonFiniteLoss, TrainContext, train_step
from torchtitan.config.preflight import build_model_args, compile_loss_enabled, preflight

logger = logging.getLogger("torchtitan")
DEFAULT_TOKENIZER = os.path.join(os.path.dirname(__file__), "assets", "tokenizer")


def train(cfg: JobConfig) -> list[dict]:
    device_type = detect_device_type()
    fake = cfg.comm.mode == "fake_backend"
    rank, world = dist_utils.init_distributed(device_type, cfg.comm.init_timeout_seconds, fake=fake)
    device = torch.device("meta") if fake else local_device(device_type)
    dims = ParallelDims.from_config(cfg.parallelism, world)
    mesh = dims.build_mesh("cpu" if fake else device_type) if world > 1 or fake else None
    spec = get_train_spec(cfg.model.name)
    model_args = build_model_args(spec, cfg, device_type)
    if fake:
        from torchtitan.tools.dry_run import dry_run

        return dry_run(spec, model_args, dims, cfg)

    tokenizer = spec.build_tokenizer_fn(cfg.model.tokenizer_path or DEFAULT_TOKENIZER, cfg.model.tokenizer_backend)
    check_vocab_fits(tokenizer, model_args.vocab_size, cfg.model.tokenizer_path or DEFAULT_TOKENIZER)
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    dataloader = spec.build_dataloader_fn(cfg.training, tokenizer, dp_rank, dims.dp, cfg.job.dump_folder)

    # Build on the meta device: no memory until parallelisms have decided what each rank holds.
    dist_utils.set_determinism(cfg.training.seed if cfg.training.seed is not None else 0, cfg.training.deterministic)
    with torch.device("meta"):
        model = spec.model_cls(model_args)
    if cfg.training.fused_output_loss:
        fuse_output_into_loss(model)  # the loss applies the output weight, chunk by chunk
    compile_loss = compile_loss_enabled(cfg, dims.tp)
    if cfg.compile.enable and "loss" in cfg.compile.components and not compile_loss:
        logger.info("compile: the loss stays eager under tensor-parallel loss_parallel (see config/preflight.py)")
    loss_fn = spec.build_loss_fn(cfg.training, compile_loss)
    loss_scale = [1.0]  # train_step writes each step's global scale here; the pipeline loss reads it
    if dims.pp_enabled:
        pp_schedule, model_parts, has_first, has_last = spec.pipelining_fn(
            model, dims, cfg, device, spec.parallelize_fn, loss_fn=loss_fn, loss_scale=loss_scale)
    else:
        model_parts, pp_schedule, has_first, has_last = [spec.parallelize_fn(model, dims, cfg, device_type)], None, True, True
    for part in model_parts:
        part.to_empty(device=device)
        part.init_weights(buffer_device=device)
        part.train()
    if cfg.training.fused_output_loss and has_last:
        loss_fn.head = next(p.output for p in model_parts if getattr(p, "output", None) is not None)
    if cfg.memory_estimation.enabled:
        from torchtitan.tools.dry_run import rank_memory_line

        logger.info(rank_memory_line(model_parts, dims, cfg))

    optimizers = spec.build_optimizers_fn(model_parts, cfg.optimizer, device_type)
    lr_schedulers = spec.build_lr_schedulers_fn(optimizers, cfg.lr_scheduler, cfg.training.steps)
    state = TrainState()
    checkpoint = CheckpointManager(
        cfg.checkpoint, cfg.job.dump_folder,
        {"model": ModelWrapper(model_parts), "optimizer": optimizers, "lr_scheduler": lr_schedulers,
         "dataloader": dataloader, "train_state": state},
        cfg.training.steps, model_adapter=spec.state_dict_adapter and spec.state_dict_adapter(model_args))
    if cfg.checkpoint.create_seed_checkpoint:
        checkpoint.save_seed()
        return []
    state.step = checkpoint.load()

    ctx = TrainContext(cfg=cfg, dims=dims, mesh=mesh, model_parts=model_parts, pp_schedule=pp_schedule,
                       has_first=has_first, has_last=has_last, device=device,
                       loss_fn=loss_fn, optimizers=optimizers, lr_schedulers=lr_schedulers, loss_scale=loss_scale)
    metrics = MetricsLogger(cfg.metrics, cfg.job.dump_folder, rank, device_type, model_args.flops_per_token(cfg.training.seq_len),
                            world, cfg.training.steps, write_files=(rank == 0))
    logger.info(f"{cfg.model.name} {cfg.model.flavor}: {model_args.num_params(False):,} params, {dims.describe()}, "
                f"device {device_type}, steps {state.step + 1}..{cfg.training.steps}")

    profiler = Profiler(cfg.profiling, cfg.job.dump_folder, rank, device_type, state.step)
    gc.disable()  # collect on a schedule, so no rank stalls at a random step
    data_iter = iter(dataloader)
    records = []
    while state.step < cfg.training.steps:
        state.step += 1
        if state.step % cfg.training.gc_freq == 0:
            gc.collect(1)
        result = train_step(ctx, data_iter, metrics)
        profiler.step(state.step)
        state.tokens_seen += result.global_tokens
        if metrics.should_log(state.step):
            rec = result.log(state.step, metrics, lr_schedulers.get_last_lr())
            records.append(rec)
        last = state.step == cfg.training.steps
        if checkpoint.should_save(state.step, last):
            result.check_finite(state.step)  # never write a checkpoint of NaN weights
            checkpoint.save(state.step, last=last)
        if state.step == 1:
            dist_utils.set_pg_timeout(cfg.comm.train_timeout_seconds)
    checkpoint.close()
    metrics.close()
    profiler.close()
    gc.enable()  # train() may be called again in this process (tests/integration/parity_driver.py)
    logger.info("training finished")
    return records


def main(argv: list[str] | None = None) -> int:
    init_logging()
    try:
        cfg = load_config(argv)
        if cfg.job.print_config:
            print(to_toml(cfg))
            return 0
        preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except (CheckpointError, ConfigError, ValueError, NonFiniteLoss) as e:
        logger.error(f"error: {e}")
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
