"""Source mixtures and stages through the real trainer: preflight errors via run_train.sh, one order on every
layout, exact resume after SIGKILL, a stage-1 -> stage-2 switch, and OLMo's fine-tuning command as written."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.integration.kill_helpers import complete_steps, kill_and_resume
from tests.launch import DEBUG_CONFIG, ROOT, TINY, read_metrics, run_python, run_train, run_train_sh
from torchtitan.components.lr_scheduler import lr_factor
from torchtitan.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]
RANGES = {"a": (0, 600), "b": (1200, 2000)}  # two sources whose tokens differ


def _sources(tmp, ratios: dict[str, float], tokens: int = 64 * 400) -> str:
    """A config extending the debug one with [[data.sources]] over synthetic token files."""
    text = [f'extends = "{DEBUG_CONFIG}"']
    for name, ratio in ratios.items():
        folder = os.path.join(tmp, "data", name)
        if not os.path.isdir(folder):
            os.makedirs(folder)
            rng = np.random.default_rng(len(name))
            rng.integers(*RANGES[name], tokens, dtype=np.uint16).tofile(os.path.join(folder, "part-0.npy"))
        text += ["[[data.sources]]", f'name = "{name}"', f'paths = ["{folder}/*.npy"]', f"target_ratio = {ratio}"]
    path = os.path.join(tmp, f"mix_{'_'.join(f'{k}{v}' for k, v in ratios.items())}.toml")
    with open(path, "w") as f:
        f.write("\n".join(text) + "\n")
    return path


def test_too_small_source_is_one_line_exit_2_and_writes_nothing(tmp_path):
    config = _sources(str(tmp_path), {"a": 0.5, "b": 0.5}, tokens=64 * 10)
    dump = str(tmp_path / "run")
    proc = run_train_sh(1, dump, ["--training.steps", "20", *TINY[:4]], extra_env={"CONFIG": config})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "data.sources[0] (a) needs 2,560 tokens" in errors[0] and "has 640" in errors[0], errors
    assert not os.path.exists(dump)


def test_one_order_on_every_layout_and_exact_resume_mid_mixture(tmp_path):
    config = _sources(str(tmp_path), {"a": 0.7, "b": 0.3})
    args = [*TINY, "--training.steps", "8"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_train(one, args, config=config)
    run_train(two, [*args, "--training.local_batch_size", "2"], config=config, nproc=2)  # FSDP2 over 2: same batch
    with open(os.path.join(one, "global_indices.npy"), "rb") as f, \
            open(os.path.join(two, "global_indices.npy"), "rb") as g:
        assert f.read() == g.read()
    a, b = read_metrics(one), read_metrics(two)
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k.startswith("data/")} == {k: v for k, v in y.items()
                                                                          if k.startswith("data/")}
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    last = a[-1]
    assert last["data/a/tokens"] + last["data/b/tokens"] == 8 * 4 * 63

    run = str(tmp_path / "killed")
    ckpt = ["--checkpoint.enable_checkpoint", "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0"]
    resumed_from, after = kill_and_resume(run, [*args, *ckpt], kill_step=5, steps=8, config=config)
    assert resumed_from in (2, 4) and 4 in complete_steps(run)
    reference = {r["step"]: r for r in a}
    for r in after:  # bitwise: the mixture's order and its per-source counts survive the restart
        assert (r["loss"], r["grad_norm"], r["data/a/tokens"]) == \
            (reference[r["step"]]["loss"], reference[r["step"]]["grad_norm"], reference[r["step"]]["data/a/tokens"])


def test_stage_two_from_stage_one_switches_mixture_and_anneals_to_zero(tmp_path):
    tmp = str(tmp_path)
    s1, s2, s2_killed = (os.path.join(tmp, n) for n in ("stage1", "stage2", "stage2_killed"))
    # Stage 1 stops at step 6 of a 20-step schedule (as OLMo 2's stage 1 stopped partway through its cosine).
    run_train(s1, [*TINY, "--training.steps", "6", "--lr_scheduler.total_steps", "20", "--checkpoint.enable",
                   "--checkpoint.interval", "6", "--checkpoint.last_save_model_only", "false"],
              config=_sources(tmp, {"a": 0.9, "b": 0.1}))
    base = load_config(["--job.config_file", DEBUG_CONFIG], env={})
    sched = base.lr_scheduler
    peak = base.optimizer.lr * lr_factor(7, warmup_steps=2, total_steps=20, decay_ratio=sched.decay_ratio,
                                         decay_type=sched.decay_type, min_lr_factor=sched.min_lr_factor)
    # ^ what stage 1 would have used next: its logged lr of step 7
    stage1_ckpt = os.path.join(s1, "checkpoint", "step-6")
    stage2 = [*TINY, "--training.steps", "6", "--checkpoint.initial_load_path", stage1_ckpt,
              "--checkpoint.reset_trainer_state", "--lr_scheduler.start_lr_from_checkpoint",
              "--lr_scheduler.warmup_steps", "0", "--lr_scheduler.decay_type", "linear",
              "--lr_scheduler.min_lr_factor", "0"]
    config2 = _sources(tmp, {"a": 0.1, "b": 0.9})
    proc = run_train(s2, stage2, config=config2)
    assert "(model, optimizer), trainer state reset" in proc.stdout + proc.stderr  # weights and moments
    r1, r2 = read_metrics(s1), read_metrics(s2)
    assert [r["step"] for r in r2] == list(range(1, 7))  # the step counter starts afresh
    lrs = [r["lr"] for r in r2]
    assert lrs[0] == pytest.approx(peak, rel=1e-9) and lrs[-1] == 0.0
    assert np.allclose(np.diff(lrs), -peak / 5)  # linear from the start to 0 at the last step
    share = {name: r1[-1][f"data/{name}/tokens"] / (6 * 4 * 63) for name in "ab"}
    assert share["a"] == pytest.approx(0.9, abs=0.05)
    share = {name: r2[-1][f"data/{name}/tokens"] / (6 * 4 * 63) for name in "ab"}
    assert share["b"] == pytest.approx(0.9, abs=0.05)  # the switch, counted from stage 2's own start

    # Killed inside stage 2 and started again with the same command: it resumes its own checkpoint, exactly.
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0"]
    resumed_from, after = kill_and_resume(s2_killed, [*stage2, *ckpt], kill_step=3, steps=6, config=config2)
    reference = {r["step"]: r for r in r2}
    for r in after:
        assert (r["loss"], r["lr"]) == (reference[r["step"]]["loss"], reference[r["step"]]["lr"]), r["step"]


def test_olmo_fine_tuning_command_runs_as_written(tmp_path):
    tmp = str(tmp_path)
    sft = os.path.join(tmp, "sft.jsonl")
    with open(sft, "w") as f:
        for i in range(40):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                             {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n")
    out = os.path.join(tmp, "tulu")
    p = run_python([os.path.join(ROOT, "scripts", "prepare_sft_data.py"), "--source", sft, "--out-dir", out,
                    "--max-seq-len", "64"])
    assert p.returncode == 0, p.stderr[-2000:]
    pre = os.path.join(tmp, "pretrain")
    run_train(pre, [*TINY, "--training.steps", "2", "--checkpoint.enable", "--checkpoint.interval", "2",
                    "--checkpoint.last_save_model_only", "false"])
    ckpt = os.path.join(pre, "checkpoint", "step-2")
    dump = os.path.join(tmp, "finetune")
    # OLMo: torchrun ... scripts/train.py CONFIG --data.paths=[...] --data.label_mask_paths=[...] --load_path=CKPT
    # --reset_trainer_state; here run_train.sh stands for torchrun ... scripts/train.py.
    proc = run_train_sh(1, dump, [DEBUG_CONFIG, f"--data.paths=[{out}/input_ids.npy]",
                                  f"--data.label_mask_paths=[{out}/label_mask.npy]", f"--load_path={ckpt}",
                                  "--reset_trainer_state", "--training.seq_len", "64", "--training.local_batch_size",
                                  "4", "--training.steps", "3", "--metrics.log_freq", "1"])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "model, optimizer" in log and "trainer state reset" in log
    assert [r["step"] for r in read_metrics(dump)] == [1, 2, 3]
