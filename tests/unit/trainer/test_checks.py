"""Every check of a job's config (trainer/checks.py): one line naming the key, before any process group."""
from __future__ import annotations

import os

import pytest

from tests.launch import ROOT
from tests.pipeline_helpers import pp_cfg
from torchtitan.config import ConfigError, load_config
from torchtitan.distributed import pipeline
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.models import get_train_spec
from torchtitan.models.llama3 import llama3_flavors
from torchtitan.trainer.checks import check_config, check_layout
from torchtitan.trainer.plan import make_plan


def _plan(*argv: str, world: int = 1):
    return make_plan(load_config(list(argv), env={}), world, device_type="cpu")


@pytest.mark.parametrize("argv,fragment", [
    (["--training.steps", "0"], "training.steps must be >= 1"),
    (["--activation_checkpoint.selective_ac_option", "x"], "selective_ac_option"),
    (["--training.gc_freq", "0"], "training.gc_freq must be >= 1"),
    (["--checkpoint.enable", "--checkpoint.interval", "0"], "checkpoint.interval must be >= 1"),
    (["--profiling.enable_profiling", "--profiling.profile_freq", "0"], "profiling.profile_freq must be >= 1"),
    (["--lr_scheduler.warmup_steps", "-1"], "lr_scheduler.warmup_steps must be >= 0"),
    (["--lr_scheduler.decay_ratio", "1.5"], "lr_scheduler.decay_ratio must be in [0, 1]"),
    (["--validation.enable", "--validation.seq_len", "0"], "validation.seq_len must be -1 or >= 1"),
    (["--parallelism.expert_parallel_degree", "0"], "parallelism.expert_parallel_degree must be >= 1"),
    (["--optimizer.lr", "-1e-3"], "optimizer.lr must be >= 0"),
    (["--optimizer.beta2", "1.0"], "optimizer.beta2 must be in [0, 1)"),
    (["--lr_scheduler.min_lr_factor", "2"], "lr_scheduler.min_lr_factor must be in [0, 1]"),
    (["--comm.train_timeout_seconds", "0"], "comm.train_timeout_seconds must be >= 1"),
    (["--training.loss_chunk_size", "-8"], "training.loss_chunk_size must be >= 0"),
    (["--profiling.enable_profiling", "--profiling.profiler_active", "20"], "profiler_active = 20 must be at most"),
    (["--training.steps", "100", "--lr_scheduler.total_steps", "50"], "lr_scheduler.total_steps = 50 must be at least"),
    (["--lr_scheduler.grad_clip_warmup_steps", "1000"], "set both or neither, got 1000 and None"),
    (["--lr_scheduler.grad_clip_warmup_factor", "10"], "set both or neither, got None and 10.0"),
    (["--lr_scheduler.grad_clip_warmup_steps", "-1", "--lr_scheduler.grad_clip_warmup_factor", "10"],
     "lr_scheduler.grad_clip_warmup_steps must be >= 0"),
    (["--lr_scheduler.grad_clip_warmup_steps", "10", "--lr_scheduler.grad_clip_warmup_factor", "-2"],
     "grad_clip_warmup_factor > 0, got 10 and -2.0"),
    (["--training.max_norm", "0", "--lr_scheduler.grad_clip_warmup_steps", "10",
      "--lr_scheduler.grad_clip_warmup_factor", "5"], "needs training.max_norm > 0"),
    (["--optimizer.weight_decay", "0", "--optimizer.decay_embeddings=false"], "needs optimizer.weight_decay > 0"),
    (["--optimizer.name", "Muon", "--optimizer.muon_ns_coefficients", "[3.4, -4.7]"],
     "optimizer.muon_ns_coefficients needs 3 values"),
    (["--optimizer.name", "Muon", "--optimizer.muon_ns_steps", "0"], "optimizer.muon_ns_steps 1..99"),
    (["--optimizer.qk_clip_threshold", "0"], "optimizer.qk_clip_threshold must be > 0"),
])
def test_config_checks(argv, fragment):
    with pytest.raises(ConfigError) as e:
        check_config(load_config(argv, env={}))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_validation_shape_defaults_to_training():
    """validation.seq_len / local_batch_size left at their defaults follow training's: the model (its RoPE
    table) is built for training.seq_len, so a fixed default of 2048 crashed a 256-token run mid-way."""
    plan = _plan("--training.seq_len", "256", "--training.local_batch_size", "2", "--validation.enable")
    assert plan.validation_shape == (256, 2)
    plan = _plan("--training.seq_len", "256", "--validation.enable", "--validation.seq_len", "128",
                 "--validation.local_batch_size", "4")
    assert plan.validation_shape == (128, 4)


def test_validation_longer_than_the_model_is_an_error():
    with pytest.raises(ConfigError, match=r"^validation.seq_len = 512 exceeds training.seq_len = 256"):
        _plan("--training.seq_len", "256", "--validation.enable", "--validation.seq_len", "512")


def test_validation_under_pipeline_parallel_defaults_fit():
    """Under PP the stages are built for one micro-batch shape: the defaults give exactly that shape."""
    base = ("--training.seq_len", "64", "--training.local_batch_size", "4", "--parallelism.pipeline_parallel_degree",
            "2", "--parallelism.pipeline_parallel_schedule", "GPipe", "--validation.enable")
    assert _plan(*base, world=2).validation_shape == (64, 4)
    with pytest.raises(ConfigError, match="must equal training's"):
        _plan(*base, "--validation.local_batch_size", "2", world=2)


def test_global_batch_counts_replica_groups(monkeypatch):
    """Fault tolerance: the global batch counts every replica group. 24 = local 4 x dp 1 x 4 groups x 1.5 is not
    a whole number of micro-batches: a one-line error (it used to train 16-sequence steps silently)."""
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "http://localhost:29510")
    ft = ("--fault_tolerance.enable", "--fault_tolerance.group_size", "4", "--training.local_batch_size", "4")
    with pytest.raises(ConfigError, match=r"^training.global_batch_size = 24 must be a multiple of "
                                          r"training.local_batch_size 4 x data-parallel degree 1 x "
                                          r"fault_tolerance.group_size 4 = 16$"):
        _plan(*ft, "--training.global_batch_size", "24")
    batch = _plan(*ft, "--training.global_batch_size", "32").batch
    assert (batch.accumulation, batch.global_batch_size, batch.group_batch_size) == (2, 32, 8)
    assert batch.step_tokens(groups_present=3) == 8 * 2048 * 3


def test_plan_batch_without_groups():
    batch = _plan("--training.local_batch_size", "2", "--training.global_batch_size", "8", world=2).batch
    assert (batch.dp, batch.accumulation, batch.global_batch_size) == (2, 2, 8)
    with pytest.raises(ConfigError, match=r"global_batch_size = 6 must be a multiple of .* = 4$"):
        _plan("--training.local_batch_size", "2", "--training.global_batch_size", "6", world=2)


def test_async_tp_needs_cuda_and_compile():
    with pytest.raises(ConfigError, match="enable_async_tensor_parallel needs CUDA and compile.enable"):
        _plan("--parallelism.tensor_parallel_degree", "2", "--parallelism.enable_async_tensor_parallel",
              "--training.seq_len", "64", world=2)


def test_unknown_rotate_method_is_rejected_when_parsed():
    with pytest.raises(ConfigError, match="context_parallel_rotate_method: 'ring' is not one of allgather, alltoall"):
        load_config(["--parallelism.context_parallel_rotate_method", "ring"], env={})


@pytest.mark.parametrize("extra,message", [
    (["--model.name", "llama3", "--moe.router_z_loss_weight", "0.01"], "llama3 debugmodel is a dense model"),
    (["--moe.expert_bias_update_rate", "0.01"], "has no expert bias"),
    (["--moe.load_balance_loss_weight", "0", "--moe.load_balance_scope", "micro_batch"],
     "needs moe.load_balance_loss_weight > 0"),
])
def test_moe_options_without_effect_are_one_line_errors(extra, message):
    config = os.path.join(ROOT, "train_configs", "olmoe_debug.toml")
    make_plan(load_config(["--job.config_file", config], env={}), 1)
    # The file's [moe] keys under a dense flavor picked on the command line pass (the benchmark's comparator).
    make_plan(load_config(["--job.config_file", config, "--model.flavor", "debugmodel-dense"], env={}), 1)
    with pytest.raises(ConfigError, match=message):
        make_plan(load_config(["--job.config_file", config, *extra], env={}), 1)


@pytest.mark.parametrize("schedule,batch,compile_on,message", [
    ("DualPipeV", 2, False, "at least as many micro-batches as stages"),
    ("Interleaved1F1B", 5, False, "use a multiple of 2"),
    ("ZBVZeroBubble", 4, True, "compile.enable = false"),
])
def test_schedule_constraints_fail_in_preflight(schedule, batch, compile_on, message):
    cfg = pp_cfg(pipeline_parallel_schedule=schedule)
    cfg.training.local_batch_size, cfg.compile.enable = batch, compile_on
    with pytest.raises(ConfigError, match=message):
        _check(cfg)
    with pytest.raises(ConfigError, match=message):
        make_plan(cfg, 2)


def _check(cfg, on_cpu: bool = False) -> None:
    """The layout checks of the debug model over 2 ranks, on CPU (gloo) or on CUDA (NCCL)."""
    check_layout(cfg, get_train_spec("llama3"), llama3_flavors["debugmodel"],
                 ParallelDims.from_config(cfg.parallelism, 2), device_type="cpu" if on_cpu else "cuda",
                 validation_shape=(cfg.training.seq_len, cfg.training.local_batch_size))


def test_v_schedules_on_old_torch_gloo_fail_in_preflight(monkeypatch):
    """torch < 2.12 opens pipeline links with a send to the same rank, which gloo cannot do: say so up front."""
    monkeypatch.setattr(pipeline, "warmup_sends_to_self", lambda: True)
    cfg = pp_cfg(pipeline_parallel_schedule="ZBVZeroBubble")
    cfg.training.local_batch_size = 4
    with pytest.raises(ConfigError, match="ZBVZeroBubble puts neighbouring stages on one rank.*torch >= 2.12"):
        _check(cfg, on_cpu=True)
    _check(cfg, on_cpu=False)  # NCCL sends to the same rank
    cfg.parallelism.pipeline_parallel_schedule = "Interleaved1F1B"
    _check(cfg, on_cpu=True)


@pytest.mark.parametrize("argv,fragment", [
    (["--model.name", "olmo2"], "olmo2 debugmodel: it normalizes q and k (qk_norm)"),
    (["--model.name", "deepseek_v3"], "has no per-head q/k projections"),
    (["--parallelism.context_parallel_degree", "2"], "context parallel attends K/V chunks on other ranks"),
    (["--compile.enable"], "compile.enable: the tracked maximum"),
])
def test_qk_clip_where_it_cannot_apply(argv, fragment):
    with pytest.raises(ConfigError, match="^optimizer.qk_clip_threshold cannot be used with ") as e:
        _plan("--optimizer.qk_clip_threshold", "100", *argv, world=2 if "context" in argv[0] else 1)
    assert fragment in str(e.value) and "\n" not in str(e.value)
