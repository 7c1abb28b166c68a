"""scripts/gpu_check.sh's plumbing without a GPU (--dry), and the parser of torchtitan's step lines."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.launch import ROOT
from tests.unit.test_benchmark_harness import _bench


def _gpu_check(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               PYTHON=sys.executable, TORCHTITAN_FORCE_CPU="1")
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)


def test_parses_torchtitan_step_lines_per_row():
    out = "\n".join([
        "== 8b8l_compile_sacop (exit 0)",
        "\x1b[31mstep: 20  loss: 7.1  grad_norm: 1.2  memory: 43.70GiB(46.0%)  tps: 29,000  tflops: 490.00  "
        "mfu: 49.50%\x1b[39m",
        "step: 30  loss: 7.0  grad_norm: 1.1  memory: 43.70GiB(46.0%)  tps: 29,400  tflops: 494.00  mfu: 49.90%",
        "== 1b_compile_noac (exit 0)",
        "step: 30  loss: 6.0  grad_norm: 1.0  memory: 46.80GiB(49.2%)  tps: 49,800  tflops: 530.00  mfu: 53.70%",
        "== 8b8l_eager_sacop (exit 124)",
    ])
    rows = _bench().parse_baseline(out)
    assert set(rows) == {"8b8l_compile_sacop", "1b_compile_noac"}  # a row that printed no step has no numbers
    assert rows["8b8l_compile_sacop"] == {"tps": 29200.0, "tflops": 492.0, "mfu": 49.7, "memory_gib": 43.7}
    assert rows["1b_compile_noac"]["tps"] == 49800.0


def test_bad_arguments_are_one_line_and_exit_2(tmp_path):
    for args in (["--part", "everything"], ["--frobnicate"]):
        proc = _gpu_check(*args, tmp_path=tmp_path)
        assert proc.returncode == 2 and len(proc.stdout.strip().splitlines()) == 1, proc.stdout + proc.stderr
        assert "valid" in proc.stdout


@pytest.mark.slow
def test_dry_runs_every_step_but_the_gpu_rows(tmp_path):
    out, wheels = tmp_path / "results", tmp_path / "no_wheels"
    wheels.mkdir()
    proc = _gpu_check("--dry", "--wheels", str(wheels), "--out", str(out), tmp_path=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    files = {p.name: p.read_text() for p in out.iterdir() if p.suffix == ".txt"}
    assert set(files) == {"cuda_tests.txt", "rows_cpu.txt", "rows_shared.txt", "rows_extra.txt", "profile.txt"}
    assert all(text.startswith("# ") and "torch " in text.splitlines()[0] for text in files.values())
    assert "skipped" in files["cuda_tests.txt"] and "cpu_debug" in files["rows_cpu.txt"]
    bench = _bench()
    planned = [line.split()[0] for line in (files["rows_shared.txt"] + files["rows_extra.txt"]).splitlines()
               if "plan ok" in line]
    assert set(planned) == {name for name in bench.ROWS if name != "cpu_debug"}
    assert "aten::mm" in files["profile.txt"] and (out / "trace_cpu_debug.json.gz").exists()
    assert "no torchtitan 0.2.2 wheel" in proc.stdout
