"""Exact resume after SIGKILL (the dense debug model on one process; OLMoE's under FSDP + expert parallel 2),
weights-only export read by stock DCP tools, and data-state errors.

Everything here runs the real trainer in subprocesses (torchrun, CPU).
"""
from __future__ import annotations

import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.integration.checkpoint_helpers import MOE_CONFIG
from tests.integration.kill_helpers import complete_steps, kill_and_resume
from tests.launch import ROOT, TINY, losses, read_metrics, run_python, run_train

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


def _guarded_kill_and_resume(tmp_path, optimizer: list[str]) -> str:
    """The guard's skips, the optimizer's state and the data position survive a SIGKILL: bitwise equal losses."""
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    run_train(ref, [*TINY, *GUARD, *optimizer, "--training.steps", str(STEPS)])  # uninterrupted, no checkpointing
    reference = {r["step"]: (r["loss"], r["grad_norm"], r["skipped_steps"]) for r in read_metrics(ref)}
    assert 0 < reference[STEPS][2] < STEPS - 2, reference  # the guard skips some steps, not all

    resumed_from, after_restart = kill_and_resume(run, [*TINY, *GUARD, *optimizer, *CKPT], kill_step=6, steps=STEPS)
    assert resumed_from in (4, 8), complete_steps(run)
    for r in after_restart:
        # Bitwise, data order and the spike guard's skips included.
        assert (r["loss"], r["grad_norm"], r["skipped_steps"]) == reference[r["step"]], r["step"]
    return run


def test_muon_with_the_spike_guard_resumes_bitwise(tmp_path):
    """Muon skips a guarded step on the device flag like fused AdamW; its momentum is in the checkpoint."""
    _guarded_kill_and_resume(tmp_path, ["--optimizer.name", "Muon"])


def test_sigkill_between_checkpoints_then_resume_is_bitwise(tmp_path):
    run = _guarded_kill_and_resume(tmp_path, [])

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
    resumed_from, after_restart = kill_and_resume(run, [*MOE_EP2, *MOE_CKPT], kill_step=5, steps=MOE_STEPS, **moe)
    assert resumed_from in (2, 4, 6), complete_steps(run)
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
        assert complete_steps(dump) == [1] and losses(dump).keys() == {1}

    # Another vocabulary (flavor): the mismatching tensors are named before anything is read.
    fails(["--model.vocab_size", "4096"], "ERROR error: checkpoint " + step1 + " does not fit this model",
          "tok_embeddings.weight is [2048, 256] in the checkpoint but [4096, 256] in the model")
    # Global micro-batch 4 -> 8: the saved data position (window 4) is not on a boundary of the new batch.
    fails(["--training.local_batch_size", "8"], "keep local_batch_size x dp the same")
