"""SIGKILL a training mid-run (torchrun and its workers, like kill -9 of the job) and run the same command again:
shared by the resume tests."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.integration.checkpoint_helpers import train_argv
from tests.launch import DEBUG_CONFIG, ROOT, _env, read_metrics, run_train


def _descendants(pid: int) -> list[int]:
    """Every process below pid: torchrun starts its workers in their own sessions, so killpg misses them."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _sigkill_tree(pid: int) -> None:
    for p in [pid, *_descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_gone(pids: list[int], timeout: float = 30) -> None:
    """SIGKILL is asynchronous: the next run must not start while the killed worker still writes."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except OSError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"process {pid} survived SIGKILL for {timeout}s")


def _kill_after_step(dump: str, args: list[str], kill_step: int, timeout: float = 240, nproc: int = 1,
                     config: str = DEBUG_CONFIG) -> int:
    """Start training, SIGKILL the whole process group once metrics.jsonl shows kill_step and a checkpoint is
    complete (an async save can still be writing steps later on a loaded machine); return the last step seen."""
    log = open(os.path.join(dump, "killed_run.log"), "w")
    proc = subprocess.Popen([sys.executable, *train_argv(dump, args, nproc, config)], cwd=ROOT, env=_env(None),
                            stdout=log, stderr=subprocess.STDOUT)
    path, deadline, seen = os.path.join(dump, "metrics.jsonl"), time.monotonic() + timeout, 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.isfile(path):
                with open(path) as f:
                    seen = max([json.loads(line)["step"] for line in f if line.strip()] or [0])
                if seen >= kill_step and complete_steps(dump):
                    break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before step {kill_step}: see {log.name}"
        workers = _descendants(proc.pid)
        _sigkill_tree(proc.pid)  # like kill -9 of the job: torchrun and its workers, no clean-up
        proc.wait(30)
        _wait_gone(workers)
    finally:
        if proc.poll() is None:
            _sigkill_tree(proc.pid)
        log.close()
    return seen


def complete_steps(dump: str) -> list[int]:
    root = os.path.join(dump, "checkpoint")
    if not os.path.isdir(root):
        return []
    return sorted(int(n.split("-")[1]) for n in os.listdir(root) if os.path.isfile(os.path.join(root, n, ".complete")))


def kill_and_resume(run: str, args: list[str], kill_step: int, steps: int, **launch_kw) -> tuple[int, list[dict]]:
    """SIGKILL a training after kill_step, run the same command again; returns the step it resumed from and the
    metrics records logged after the restart (which must be steps resumed_from + 1 .. steps)."""
    os.makedirs(run)
    seen = _kill_after_step(run, args, kill_step, **launch_kw)
    assert seen < steps
    resumed_from = max(complete_steps(run))
    proc = run_train(run, args, **launch_kw)  # the same command again
    assert f"loading checkpoint {os.path.join(run, 'checkpoint', f'step-{resumed_from}')}" in proc.stdout + proc.stderr
    records = read_metrics(run)
    after_restart = records[[i for i, r in enumerate(records) if r["step"] == resumed_from + 1][-1]:]
    assert [r["step"] for r in after_restart] == list(range(resumed_from + 1, steps + 1))
    return resumed_from, after_restart
