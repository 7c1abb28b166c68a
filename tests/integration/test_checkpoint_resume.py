"""Exact resume after SIGKILL (the dense debug model on one process; OLMoE's under FSDP + expert parallel 2),
weights-only export read by stock DCP tools, and data-state errors.

Everything here runs the real trainer in subprocesses (torchrun, CPU).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.integration.checkpoint_helpers import MOE_CONFIG, train_argv
from tests.launch import DEBUG_CONFIG, ROOT, TINY, _env, losses, read_metrics, run_python, run_train

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEPS = 12
CKPT = ["--training.steps", str(STEPS), "--checkpoint.enable_checkpoint", "--checkpoint.interval", "4",
        "--checkpoint.async_mode", "async", "--checkpoint.keep_latest_k", "0", "--checkpoint.export_dtype", "bfloat16"]
# A spike guard tight enough to skip some of these steps (about two thirds of the 12 on the bundled corpus, whose
# early gradient norms climb, before and after the kill): its window must survive the restart for the skips (and
# so the losses) to stay the same.
GUARD = ["--training.spike_guard_sigma", "1.0", "--training.spike_guard_window", "6"]

# Expert parallel: OLMoE's debug model (balance losses on) under FSDP + EP2 on 2 processes, global batch 4 x 64.
MOE_STEPS = 8
MOE_EP2 = [*TINY, "--training.steps", str(MOE_STEPS), "--parallelism.expert_parallel_degree", "2",
           "--training.local_batch_size", "2"]
MOE_CKPT = ["--checkpoint.enable_checkpoint", "--checkpoint.interval", "2", "--checkpoint.async_mode", "async",
            "--checkpoint.keep_latest_k", "0"]
MOE_METRICS = ("loss", "grad_norm", "load_balance_loss", "router_z_loss", "expert_imbalance")


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
    """Start training, SIGKILL the whole process group once metrics.jsonl shows kill_step; return the last step seen."""
    log = open(os.path.join(dump, "killed_run.log"), "w")
    proc = subprocess.Popen([sys.executable, *train_argv(dump, args, nproc, config)], cwd=ROOT, env=_env(None),
                            stdout=log, stderr=subprocess.STDOUT)
    path, deadline, seen = os.path.join(dump, "metrics.jsonl"), time.monotonic() + timeout, 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.isfile(path):
                with open(path) as f:
                    seen = max([json.loads(line)["step"] for line in f if line.strip()] or [0])
                if seen >= kill_step:
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


def _complete_steps(dump: str) -> list[int]:
    root = os.path.join(dump, "checkpoint")
    return sorted(int(n.split("-")[1]) for n in os.listdir(root) if os.path.isfile(os.path.join(root, n, ".complete")))


def _kill_and_resume(run: str, args: list[str], kill_step: int, steps: int, **launch_kw) -> tuple[int, list[dict]]:
    """SIGKILL a training after kill_step, run the same command again; returns the step it resumed from and the
    metrics records logged after the restart (which must be steps resumed_from + 1 .. steps)."""
    os.makedirs(run)
    seen = _kill_after_step(run, args, kill_step, **launch_kw)
    assert seen < steps
    resumed_from = max(_complete_steps(run))
    proc = run_train(run, args, **launch_kw)  # the same command again
    assert f"loading checkpoint {os.path.join(run, 'checkpoint', f'step-{resumed_from}')}" in proc.stdout + proc.stderr
    records = read_metrics(run)
    after_restart = records[[i for i, r in enumerate(records) if r["step"] == resumed_from + 1][-1]:]
    assert [r["step"] for r in after_restart] == list(range(resumed_from + 1, steps + 1))
    return resumed_from, after_restart


def test_sigkill_between_checkpoints_then_resume_is_bitwise(tmp_path):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    run_train(ref, [*TINY, *GUARD, "--training.steps", str(STEPS)])  # uninterrupted, no checkpointing at all
    reference = {r["step"]: (r["loss"], r["grad_norm"], r["skipped_steps"]) for r in read_metrics(ref)}
    assert 0 < reference[STEPS][2] < STEPS - 2, reference  # the guard skips some steps, not all

    resumed_from, after_restart = _kill_and_resume(run, [*TINY, *GUARD, *CKPT], kill_step=6, steps=STEPS)
    assert resumed_from in (4, 8), _complete_steps(run)
    for r in after_restart:
        # Bitwise, data order and the spike guard's skips included.
        assert (r["loss"], r["grad_norm"], r["skipped_steps"]) == reference[r["step"]], r["step"]

    # Earlier checkpoints stay full; the final one is weights only, really cast to bfloat16.
    ck = os.path.join(run, "checkpoint")
    full, export = os.path.join(ck, "step-8"), os.path.join(ck, f"step-{STEPS}")
    p = run_python(["-m", "torch.distributed.checkpoint.format_utils", "dcp_to_torch", full, str(tmp_path / "full.pt")])
    assert p.returncode == 0, p.stderr[-3000:]
    dcp_to_torch_save(export, str(tmp_path / "export.pt"))  # the function that command runs
    full_pt = torch.load(tmp_path / "full.pt", weights_only=True)
    export_pt = torch.load(tmp_path / "export.pt", weights_only=True)
    assert set(full_pt) == {"model", "optimizer", "lr_scheduler", "dataloader", "train_state", "spike_guard"}
    assert set(export_pt) == {"model"}
    assert {v.dtype for v in full_pt["model"].values()} == {torch.float32}
    assert {v.dtype for v in export_pt["model"].values()} == {torch.bfloat16}
    assert int(full_pt["train_state"]["step"]) == 8

    # The .pt loads into our (Meta-named) model with the same logits as loading the DCP folder.
    from torchtitan.checkpoint.io import load_model_from_dcp
    from torchtitan.models.common.decoder import Decoder as Transformer
    from torchtitan.models.llama3 import llama3_flavors

    def fresh():
        m = Transformer(llama3_flavors["debugmodel"])
        m.init_weights(buffer_device="cpu")
        return m

    a, b = fresh(), fresh()
    a.load_state_dict(full_pt["model"], strict=True)
    load_model_from_dcp(full, b.state_dict())
    x = torch.randint(0, 2048, (2, 16))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.slow
def test_sigkill_under_expert_parallel_then_resume_is_bitwise(tmp_path):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    moe = dict(nproc=2, config=MOE_CONFIG)
    run_train(ref, MOE_EP2, **moe)  # uninterrupted, no checkpointing at all
    reference = {r["step"]: [r[k] for k in MOE_METRICS] for r in read_metrics(ref)}
    assert len(reference) == MOE_STEPS and all(v[2] > 0 and v[3] > 0 for v in reference.values()), reference

    # Killed after step 5, step-2 is surely complete: save(4) waited for its async write before starting.
    resumed_from, after_restart = _kill_and_resume(run, [*MOE_EP2, *MOE_CKPT], kill_step=5, steps=MOE_STEPS, **moe)
    assert resumed_from in (2, 4, 6), _complete_steps(run)
    print(f"EP2 SIGKILL after step 5, resumed from step {resumed_from}: steps {resumed_from + 1}-{MOE_STEPS}")
    for r in after_restart:
        # Bitwise: data order, routing, the experts' all-to-all and the balance losses over the global batch.
        assert [r[k] for k in MOE_METRICS] == reference[r["step"]], (r["step"], MOE_METRICS)


def test_resume_errors_are_one_clear_line_and_touch_nothing(tmp_path):
    dump = str(tmp_path / "run")
    run_train(dump, [*TINY, "--training.steps", "1", "--checkpoint.enable_checkpoint",
                     "--checkpoint.last_save_model_only", "false"])
    step1 = os.path.join(dump, "checkpoint", "step-1")
    before = {n: os.path.getmtime(os.path.join(step1, n)) for n in os.listdir(step1)}

    def fails(extra: list[str], *expected: str) -> None:
        proc = run_train(dump, [*TINY, "--training.steps", "3", "--checkpoint.enable_checkpoint", *extra], check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        for e in expected:
            assert e in out, out[-3000:]
        assert f'File "{ROOT}/torchtitan' not in out  # no traceback of ours (torchrun prints its own)
        assert {n: os.path.getmtime(os.path.join(step1, n)) for n in os.listdir(step1)} == before
        assert _complete_steps(dump) == [1] and losses(dump).keys() == {1}

    # Another vocabulary (flavor): the mismatching tensors are named before anything is read.
    fails(["--model.vocab_size", "4096"], "ERROR error: checkpoint " + step1 + " does not fit this model",
          "tok_embeddings.weight is [2048, 256] in the checkpoint but [4096, 256] in the model")
    # Global micro-batch 4 -> 8: the saved data position (window 4) is not on a boundary of the new batch.
    fails(["--training.local_batch_size", "8"], "keep local_batch_size x dp the same")
