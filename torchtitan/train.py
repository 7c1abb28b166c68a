"""The life of a job: config -> plan -> mesh -> train spec -> data -> model -> parallelize -> loop.

Run through `run_train.sh` (torchrun) or `python -m torchtitan.train --job.config_file ...`.
docs/architecture.md walks through this file and the layers below it.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import os
import sys
import time

import torch

from torchtitan.checkpoint import CheckpointManager, ModelInfo, ModelWrapper
from torchtitan.components.dataloader import ParallelAwareDataloader, ReplicaDataloader, build_dataloader
from torchtitan.components.float8 import convert_to_float8, precompute_float8_scales
from torchtitan.components.loss import build_loss_fn, fuse_output_into_loss
from torchtitan.components.lr_scheduler import LRSchedulersContainer, build_lr_schedulers
from torchtitan.components.metrics import MetricsLogger
from torchtitan.components.optimizer import OptimizersContainer, build_optimizers
from torchtitan.components.profiling import Profiler
from torchtitan.components.qk_clip import build_qk_clip
from torchtitan.components.tokenizer import build_tokenizer, check_vocab_fits
from torchtitan.config import JobConfig, to_toml
from torchtitan.distributed.fault_tolerance import build_replica_groups
from torchtitan.distributed.pipeline import build_pipeline
from torchtitan.distributed.utils import init_distributed, set_determinism, set_pg_timeout
from torchtitan.models.common.parallelize import parallelize_decoder
from torchtitan.tools.device import local_device
from torchtitan.tools.errors import EXIT_USER_ERROR, UserError
from torchtitan.tools.host_memory import keep_freed_memory
from torchtitan.tools.logging import init_logging
from torchtitan.trainer.balance import ExpertBalance
from torchtitan.trainer.downstream_eval import DownstreamEvaluator, build_downstream_evaluator
from torchtitan.trainer.dry_run import dry_run, rank_memory_line
from torchtitan.trainer.guards import NonFiniteGuard, SpikeGuard
from torchtitan.trainer.plan import Plan, check_job, make_plan
from torchtitan.trainer.state import TrainState
from torchtitan.trainer.step import ModelRunner, StepHooks, global_mean_loss, train_step
from torchtitan.trainer.validate import Validator

logger = logging.getLogger("torchtitan")
DEFAULT_TOKENIZER = os.path.join(os.path.dirname(__file__), "assets", "tokenizer")


@dataclasses.dataclass
class Job:
    """Everything the loop touches, built once by `build`."""

    cfg: JobConfig
    plan: Plan
    runner: ModelRunner
    hooks: StepHooks
    optimizers: OptimizersContainer
    lr_schedulers: LRSchedulersContainer
    dataloader: ParallelAwareDataloader | ReplicaDataloader
    checkpoint: CheckpointManager
    state: TrainState
    metrics: MetricsLogger
    validator: Validator | None
    downstream: DownstreamEvaluator | None
    profiler: Profiler


def build(cfg: JobConfig, plan: Plan) -> Job | list[dict]:
    """Mesh, data, model, parallelisms, optimizer and checkpoint; a dry run's or seed checkpoint's result instead
    of a Job when the run ends there."""
    t, dims, args = cfg.training, plan.dims, plan.model_args
    rank, world = init_distributed(plan.device_type, cfg.comm.init_timeout_seconds, fake=plan.dry_run)
    device = torch.device("meta") if plan.dry_run else local_device(plan.device_type)
    keep_freed_memory(device, t.cpu_keep_freed_memory)  # CPU: each step reuses the last one's pages
    if world > 1 or plan.dry_run:
        dims.build_mesh("cpu" if plan.dry_run else plan.device_type)
    # A dry run does not apply async TP (CUDA symmetric memory): the plan says so.
    parallelism = dataclasses.replace(cfg.parallelism, enable_async_tensor_parallel=False) if plan.dry_run \
        else cfg.parallelism
    parallelize = functools.partial(
        parallelize_decoder, dims=dims, parallelism=parallelism, fsdp=plan.fsdp,
        activation_checkpoint=cfg.activation_checkpoint, compile=cfg.compile,
        convert=functools.partial(convert_to_float8, cfg=cfg.float8) if plan.float8 else None)
    if plan.dry_run:
        for note in plan.notes:
            logger.warning(note)
        return dry_run(plan.spec.build_meta_model(args), dims, parallelism=cfg.parallelism, fsdp=plan.fsdp,
                       local_batch_size=t.local_batch_size, label=f"{cfg.model.name} {cfg.model.flavor}",
                       parallelize=parallelize)

    tokenizer_path = cfg.model.tokenizer_path or DEFAULT_TOKENIZER
    tokenizer = build_tokenizer(tokenizer_path, cfg.model.tokenizer_backend)
    check_vocab_fits(tokenizer, args.vocab_size, tokenizer_path)
    groups = build_replica_groups(cfg.fault_tolerance, dims, device, cfg.job.dump_folder)
    dataloader = build_dataloader(cfg.data, plan.batch, tokenizer, dp_rank=dims.local_rank("dp"),
                                  dump_folder=cfg.job.dump_folder, seed=plan.seed, groups=groups,
                                  budget=t.steps * plan.batch.global_batch_size)

    set_determinism(plan.seed, t.deterministic)
    model = plan.spec.build_meta_model(args)
    flops_per_token = model.flops_per_token(t.seq_len)
    num_params, active_params = model.num_params(), model.num_params(active=True)
    loss_fn = build_loss_fn(t, plan.compile_loss)
    if t.fused_output_loss:
        fuse_output_into_loss(model)  # the loss applies the output weight, chunk by chunk
    pipeline = None
    if dims.pp_enabled:
        pipeline = build_pipeline(model, dims=dims, parallelism=cfg.parallelism, local_batch_size=t.local_batch_size,
                                  device=device, parallelize=parallelize, loss_fn=loss_fn)
    parts = pipeline.parts if pipeline is not None else [parallelize(model)]
    for part in parts:
        part.to_empty(device=device)
        part.init_weights(buffer_device=device, seed=plan.seed)  # the same weights on every layout
        part.train()
    if t.fused_output_loss and any(part.output is not None for part in parts):
        loss_fn.head = next(part.output for part in parts if part.output is not None)
    if cfg.memory_estimation.enabled:
        logger.info(rank_memory_line(parts, dims, plan.fsdp))

    optimizers = build_optimizers(parts, cfg.optimizer, plan.device_type)
    lr_schedulers = build_lr_schedulers(optimizers, cfg.lr_scheduler, cfg.lr_scheduler.total_steps or t.steps)
    state = TrainState()
    spike_guard = SpikeGuard(t.spike_guard_sigma, t.spike_guard_window, device) if t.spike_guard_sigma > 0 else None
    checkpoint = CheckpointManager(
        cfg.checkpoint, cfg.job.dump_folder,
        {"model": ModelWrapper(parts), "optimizer": optimizers, "lr_scheduler": lr_schedulers,
         "dataloader": dataloader, "train_state": state, **({"spike_guard": spike_guard} if spike_guard else {})},
        t.steps, model=ModelInfo(cfg.model.name, cfg.model.flavor, args, os.path.abspath(tokenizer_path)))
    if cfg.checkpoint.create_seed_checkpoint:
        checkpoint.save_seed()
        return []
    # What a group (re)joining live ones receives from them; DiLoCo (semi-synchronous) wraps the parts here.
    groups.register_state(checkpoint.states, model_parts=parts, optimizers=optimizers)
    state.step = groups.resume(checkpoint.load)  # a group healed from live ones reads no checkpoint

    runner = ModelRunner(parts, loss_fn, device, pipeline, cp_mesh=dims.mesh["cp"] if dims.cp_enabled else None,
                         loss_parallel=dims.tp_enabled and not cfg.parallelism.disable_loss_parallel,
                         autocast=plan.autocast,
                         document_eos_id=tokenizer.eos_id if cfg.data.document_masking else None,
                         document_rope_restart=cfg.data.document_rope_restart)
    balance = ExpertBalance(parts, cfg.moe, dims, plan.batch.step_tokens(), device, pipeline) if args.moe else None
    hooks = StepHooks(guard=NonFiniteGuard(), groups=groups, spike_guard=spike_guard, balance=balance,
                      after_update=functools.partial(precompute_float8_scales, parts, cfg.float8)
                      if plan.float8 else None, qk_clip=build_qk_clip(cfg.optimizer, parts))
    metrics = MetricsLogger(cfg.metrics, groups.log_folder, rank, plan.device_type, flops_per_token, world, t.steps,
                            write_files=(rank == 0), run_config=dataclasses.asdict(cfg))
    active = f" ({active_params:,} active per token)" if active_params != num_params else ""
    logger.info(f"{cfg.model.name} {cfg.model.flavor}: {num_params:,} params{active}, {dims.describe()}, "
                f"{plan.batch.describe()}, device {plan.device_type}, steps {state.step + 1}..{t.steps}")
    for note in plan.notes:
        logger.warning(note)
    if cfg.job.print_args or cfg.job.print_config:  # print_config from a file; from the command line it exits
        logger.info("resolved config:\n" + to_toml(cfg, origins=True))
    validator = (Validator(cfg.validation, plan.validation_shape, cfg.data, tokenizer, dims, t.steps)
                 if cfg.validation.enable else None)
    downstream = (build_downstream_evaluator(cfg.downstream_eval, t, tokenizer, dims, args.vocab_size)
                  if cfg.downstream_eval.enable else None)
    profiler = Profiler(cfg.profiling, cfg.job.dump_folder, rank, plan.device_type, state.step)
    return Job(cfg, plan, runner, hooks, optimizers, lr_schedulers, dataloader, checkpoint, state, metrics,
               validator, downstream, profiler)


def run(job: Job) -> list[dict]:
    """The training loop: a step, its log line, validation and checkpoints, until training.steps."""
    t, state, metrics, hooks, groups = job.cfg.training, job.state, job.metrics, job.hooks, job.hooks.groups
    gc.disable()  # collect on a schedule, so no rank stalls at a random step
    data_iter = iter(job.dataloader)
    records = []
    while state.step < t.steps:
        groups.start_step()  # fault tolerance: this step's quorum (DiLoCo: at syncs); a rejoining group heals here
        state.step += 1
        if state.step % t.gc_freq == 0:
            gc.collect(1)
        t0 = time.perf_counter()
        batches = [(batch["input"], labels) for batch, labels in
                   (next(data_iter) for _ in range(job.plan.batch.accumulation))]
        metrics.add_data_time(time.perf_counter() - t0)
        lr = job.lr_schedulers.get_last_lr()  # this step's (train_step moves the schedule on)
        out = train_step(job.runner, batches, step=state.step, dims=job.plan.dims, optimizers=job.optimizers,
                         lr_schedulers=job.lr_schedulers, max_norm=job.lr_schedulers.max_norm(state.step, t.max_norm),
                         hooks=hooks)
        if not out.committed:  # a replica group failed mid-step: nothing was updated; redo it with the next quorum
            state.step -= 1
            continue
        step_tokens = job.plan.batch.step_tokens(groups.present)
        metrics.add_step(step_tokens)
        state.tokens_seen += step_tokens
        job.profiler.step(state.step)
        if metrics.should_log(state.step):
            loss = global_mean_loss(out, job.plan.dims)
            hooks.guard.check()
            extra = {"skipped_steps": int(hooks.spike_guard.skipped)} if hooks.spike_guard else {}
            extra.update(groups.metrics())
            extra.update(hooks.balance.metrics() if hooks.balance is not None else {})
            extra.update(hooks.qk_clip.metrics() if hooks.qk_clip is not None else {})
            extra.update(job.dataloader.source_metrics())  # a mixture's per-source shares and tokens
            records.append(metrics.log(state.step, loss, float(out.grad_norm), lr, extra))
        if job.validator is not None and job.validator.due(state.step):
            hooks.guard.check()
            for v in job.validator.run(job.runner):
                records.append(metrics.log_validation(state.step, v.loss, v.perplexity, v.tokens, v.seconds, v.name))
        if job.downstream is not None and job.downstream.due(state.step):
            hooks.guard.check()
            if (d := job.downstream.try_run(job.runner, state.step)) is not None:
                records.append(metrics.log_downstream(state.step, d.results, d.metric_types, d.documents, d.seconds))
        last = state.step == t.steps
        if job.checkpoint.should_save(state.step, last) and groups.saves_checkpoints:
            hooks.guard.check()  # never write a checkpoint of weights that a non-finite step reached
            job.checkpoint.save(state.step, last=last)
        if state.step == 1:
            set_pg_timeout(job.cfg.comm.train_timeout_seconds)
    for closing in (job.checkpoint, groups, metrics, job.profiler):
        closing.close()
    gc.enable()  # train() may be called again in this process (tests/integration/parity_driver.py)
    logger.info("training finished")
    return records


def train(cfg: JobConfig, plan: Plan | None = None) -> list[dict]:
    """Build the job and run it; the plan is made here when the caller has none (tests, scripts)."""
    job = build(cfg, plan or make_plan(cfg, int(os.environ.get("WORLD_SIZE", "1"))))
    return job if isinstance(job, list) else run(job)


def main(argv: list[str] | None = None) -> int:
    """User errors (config, files, data, divergence) are one line and a non-zero exit; bugs keep their traceback."""
    init_logging()
    checked = check_job(argv, int(os.environ.get("WORLD_SIZE", "1")))
    if isinstance(checked, int):
        return checked
    cfg, plan = checked
    try:
        train(cfg, plan)
    except UserError as e:
        logger.error(f"error: {e}")
        return EXIT_USER_ERROR
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
