"""The benchmark harness itself (its numbers live in docs/performance.md, never in tests)."""
import pytest

from tests.launch import run_python


def _bench():
    import importlib.util

    from tests.launch import ROOT

    spec = importlib.util.spec_from_file_location("bench", f"{ROOT}/scripts/benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_summarize_skips_warmup():
    bench = _bench()
    recs = [{"step": s, "tps": 10.0 * s, "tflops": 1.0, "mfu": None, "memory_gib": s, "data_wait_pct": 0.0}
            for s in (5, 10, 15, 20)]
    out = bench.summarize(recs, skip=10)
    assert out["tps"] == 175.0 and out["steps"] == [15, 20] and out["memory_gib"] == 20 and out["mfu"] is None


@pytest.mark.slow
def test_overhead_and_data_commands_run():
    proc = run_python(["scripts/benchmark.py", "overhead", "--steps", "3", "--warmup", "1", "--rounds", "1",
                       "--seq-len", "32", "--batch", "2"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ratio" in proc.stdout
    proc = run_python(["scripts/benchmark.py", "data", "--seconds", "0.5"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tokens/s" in proc.stdout
    proc = run_python(["scripts/benchmark.py", "loss", "--tokens", "256", "--dim", "32", "--vocab", "512",
                       "--chunk", "64"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    assert len(rows) == 3 and len({r[-1] for r in rows}) == 1, proc.stdout  # same loss value three ways


@pytest.mark.slow
def test_peers_command_runs_every_contender_it_can_import():
    proc = run_python(["scripts/benchmark.py", "peers", "--rounds", "1", "--steps", "1", "--warmup", "0",
                       "--seq-len", "32", "--batch", "2"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0] for line in proc.stdout.splitlines() if line.endswith("x")}
    assert {"ours", "ours_model", "hf_model"} <= rows, proc.stdout
    assert "roofline: ours" in proc.stdout and "4,198,144 params" in proc.stdout


def test_every_gpu_row_is_a_valid_config():
    """The rows only run on GPUs; their configs and overrides must at least load and pass preflight here."""
    from torchtitan.config import load_config
    from torchtitan.trainer.plan import make_plan

    for config, overrides, _ in _bench().ROWS.values():
        cfg = load_config(["--job.config_file", config, *overrides], env={})
        if "float8" not in overrides:  # float8 preflight wants CUDA and torchao
            make_plan(cfg, 1)


def test_the_family_yardstick_has_the_family_models_active_size():
    """benchmark.py families compares each debug flavor with a Llama of its width, depth, heads and parameters
    per token: the Llama's count is within one SwiGLU unit (3 x dim x layers) of the family model's active one."""
    from torchtitan.models import get_train_spec
    from torchtitan.models.common.decoder import Decoder

    bench = _bench()
    for family in bench.FAMILIES:
        spec = get_train_spec(family)
        args = spec.model_args("debugmodel")
        active = spec.build_meta_model(args).num_params(active=True)
        llama = bench.llama_of_active_size(args, active)
        assert (llama.dim, llama.n_layers, llama.n_heads, llama.vocab_size) == (
            args.dim, args.n_layers, args.n_heads, args.vocab_size)
        assert abs(Decoder(llama).num_params() - active) <= 3 * args.dim * args.n_layers, family
