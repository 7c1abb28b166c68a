"""scripts/plot_metrics.py, as users run it: two runs' metrics.jsonl in, one PNG of the expected panels out."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SCRIPT = os.path.join(ROOT, "scripts", "plot_metrics.py")


def write_run(folder, steps: int, downstream: bool, base: float = 8.0) -> str:
    """A metrics.jsonl as the trainer writes it: step records, validation records, downstream records."""
    os.makedirs(folder, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        lines.append({"step": step, "loss": base / step ** 0.5, "grad_norm": 1.0, "lr": 1e-3, "tps": 1000.0 + step,
                      "tflops": 0.1, "mfu": None, "memory_gib": 1.0})
        if step % 5 == 0:
            lines.append({"step": step, "validation_loss": base / step ** 0.4, "validation_ppl": 50.0,
                          "validation_tokens": 1024, "validation_seconds": 0.1})
            if downstream:
                lines.append({"step": step, "downstream/hellaswag/len_norm_v1": 0.25 + step / 100,
                              "downstream/arc_easy/acc": 0.3 + step / 200})
    path = os.path.join(folder, "metrics.jsonl")
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines))
    return path


def run_script(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def panels(stdout: str) -> dict[str, int]:
    return {line[len("panel "):].rsplit(": ", 1)[0]: int(line.rsplit(": ", 1)[1].split()[0])
            for line in stdout.splitlines() if line.startswith("panel ")}


def test_two_runs_side_by_side(tmp_path):
    import matplotlib.image

    write_run(tmp_path / "run_a", 20, downstream=True)
    # The second run is a fault-tolerance run (replica folders) without downstream evaluation.
    write_run(tmp_path / "run_b" / "replica_1", 10, downstream=False, base=9.0)
    write_run(tmp_path / "run_b" / "replica_0", 15, downstream=False, base=7.0)
    out = tmp_path / "curves.png"
    proc = run_script(tmp_path / "run_a", tmp_path / "run_b", "--out", out, "--smooth", "4")
    assert proc.returncode == 0, proc.stderr
    assert panels(proc.stdout) == {"training loss": 2, "validation loss": 2, "downstream/arc_easy/acc": 1,
                                   "downstream/hellaswag/len_norm_v1": 1, "throughput": 2}
    assert "plotting replica_0's metrics (2 replica groups logged)" in proc.stdout
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (3 * 400, 2 * 600)  # five panels: a 3 x 2 grid of 600 x 400 px
    assert image.std() > 0.01  # curves drawn, not a blank canvas
    assert "wrote" in proc.stdout and "(1200x1200 px, 5 panels)" in proc.stdout


def test_panels_without_data_are_skipped_and_jsonl_paths_work(tmp_path):
    import matplotlib.image

    path = write_run(tmp_path / "only", 4, downstream=False)  # no validation record before step 5
    out = tmp_path / "one.png"
    proc = run_script(path, "--out", out, "--labels", "mine")
    assert proc.returncode == 0, proc.stderr
    assert panels(proc.stdout) == {"training loss": 1, "throughput": 1}
    assert matplotlib.image.imread(out).shape[:2] == (400, 1200)


def test_resumed_run_keeps_the_later_records_of_repeated_steps(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import plot_metrics
    finally:
        sys.path.pop(0)
    recs = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "loss": 3.5}, {"step": 3, "loss": 3.0}]
    assert plot_metrics.series(recs, "loss") == ([1, 2, 3], [5.0, 3.5, 3.0])
    assert plot_metrics.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


@pytest.mark.parametrize("name,content,message", [
    ("missing", None, "missing: no such file or folder"),
    ("empty_dir", "", "no metrics.jsonl (nor replica_*/metrics.jsonl)"),
    ("e.jsonl", "", "e.jsonl: empty"),
    ("v.jsonl", '{"step": 5, "validation_loss": 3.0}\n', "v.jsonl: no training records"),
    ("bad.jsonl", '{"step": 1, "loss": 3.0}\n{oops\n', "bad.jsonl:2: not a JSON line"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, name, content, message):
    run = tmp_path / name
    if name.endswith(".jsonl"):
        run.write_text(content)
    elif content is not None:
        run.mkdir()
    proc = run_script(run, "--out", tmp_path / "x.png")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plot_metrics.py: error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_label_count_must_match(tmp_path):
    write_run(tmp_path / "a", 3, downstream=False)
    proc = run_script(tmp_path / "a", "--out", tmp_path / "x.png", "--labels", "a,b")
    assert proc.returncode == 2 and proc.stderr.strip() == "plot_metrics.py: error: --labels has 2 labels for 1 runs"
