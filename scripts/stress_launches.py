#!/usr/bin/env python
"""Launch the trainer many times in a row and count the launches that abort (a crash, not a wrong number).

    python scripts/stress_launches.py --launches 100 --layouts cp2,pp2_cp2 --steps 20

Each launch is `run_train.sh` on CPU with the debug model, tiny batches and one of the layouts below,
in turn. A non-zero exit is an abort; its log tail is printed. Used to show that the context-parallel
layouts no longer crash inside gloo (docs/parallelism.md, "Context parallel"): a manual check, too long
for CI.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "cp2": (2, ["--parallelism.context_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1"]),
    "cp2_allgather": (2, ["--parallelism.context_parallel_degree", "2", "--parallelism.data_parallel_shard_degree",
                          "1", "--parallelism.context_parallel_rotate_method", "allgather"]),
    "pp2_cp2": (4, ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.context_parallel_degree", "2",
                    "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
                    "--parallelism.data_parallel_shard_degree", "1"]),
    "tp2_cp2": (4, ["--parallelism.tensor_parallel_degree", "2", "--parallelism.context_parallel_degree", "2",
                    "--parallelism.data_parallel_shard_degree", "1"]),
    "fsdp2_cp2": (4, ["--parallelism.context_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "2"]),
}


def launch(layout: str, steps: int, dump: str) -> subprocess.CompletedProcess:
    nproc, args = LAYOUTS[layout]
    env = dict(os.environ, NGPU=str(nproc), TORCHTITAN_FORCE_CPU="1", OMP_NUM_THREADS="1")
    cmd = ["./run_train.sh", "--job.dump_folder", dump, "--training.steps", str(steps), "--training.seq_len", "64",
           "--training.local_batch_size", "4", "--metrics.log_freq", str(steps), "--activation_checkpoint.mode",
           "none", "--comm.init_timeout_seconds", "120", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launches", type=int, default=100, help="launches in all (the layouts take turns)")
    p.add_argument("--layouts", default="cp2,pp2_cp2", help=f"comma-separated, of {', '.join(LAYOUTS)}")
    p.add_argument("--steps", type=int, default=20, help="training steps per launch")
    a = p.parse_args()
    layouts = a.layouts.split(",")
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown:
        print(f"error: unknown layout(s) {', '.join(unknown)}; valid: {', '.join(LAYOUTS)}", file=sys.stderr)
        return 2
    aborts, t0 = {x: 0 for x in layouts}, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.launches):
            layout = layouts[i % len(layouts)]
            proc = launch(layout, a.steps, os.path.join(tmp, f"run{i}"))
            if proc.returncode != 0:
                aborts[layout] += 1
                print(f"launch {i + 1} ({layout}): exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-1500:]}")
            print(f"{i + 1}/{a.launches} {layout}: exit {proc.returncode} ({time.time() - t0:.0f}s)", flush=True)
    counts = {x: sum(1 for i in range(a.launches) if layouts[i % len(layouts)] == x) for x in layouts}
    print("aborts: " + ", ".join(f"{x} {aborts[x]}/{counts[x]}" for x in layouts))
    return 1 if any(aborts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
