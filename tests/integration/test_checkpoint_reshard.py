"""Seed checkpoint and resharding, for real: FSDP on 4 processes -> 2 -> 1, same losses as one run.

One module-scoped fixture pays for four launches (seed via run_train.sh, then one
parity_driver launch per world size that trains every layout of that size):

  seed   run_train.sh --checkpoint.create_seed_checkpoint ... (the documented command)
  w4/ref     FSDP x4 from the seed, steps 1-6, checkpoints at 2, 4, 6 (the uninterrupted reference)
  w2/seed    FSDP x2 from the seed as its own step-0, step 1 only
  w2/resume  FSDP x2 from ref's step-2, steps 3-6, async saves at 4 and 6
  w1/seed    one process from the seed, step 1 only
  w1/resume  one process from w2/resume's step-4 (written asynchronously by 2 ranks), steps 5-6
  w2/hf, w1/hf  step 1 from an HF safetensors folder (initial_load_path): FSDP ranks keep their shards

The global batch stays 4 sequences (local_batch_size 1/2/4), so the saved data
position (global windows consumed) is valid at every size.

The MoE fixture reshards expert parallel (OLMoE's debug model, experts (E, out, in) sharded on E over `ep`):
  ep2  FSDP + EP2 on 2 processes, steps 1-3, full checkpoints at 2 and 3
  ep1  one process loads ep2's step-2 with every state and saves it again at step 2, then trains step 3
  ep4  FSDP + EP4 on 4 processes does the same from ep1's step-2
  ep2_efsdp2  EP2 on 4 processes (each expert also FSDP-sharded over 2 ranks) does the same from ep4's
The four step-2 folders must hold bitwise the same tensors, model and optimizer alike.
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys

import pytest

from tests import launch
from tests.integration.checkpoint_helpers import (
    MOE_CONFIG,
    bitwise_differences,
    make_tiny_hf,
    read_dcp,
    resave_in_layout,
    run_layouts,
)
from torchtitan.checkpoint.io import read_marker

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

COMMON = [*launch.TINY, "--training.steps", "6", "--checkpoint.enable_checkpoint", "--checkpoint.interval", "2",
          "--checkpoint.keep_latest_k", "0", "--checkpoint.last_save_model_only", "false",
          "--metrics.enable_jsonl=false", "--comm.train_timeout_seconds", "60"]
SEED_COMMAND = ["--checkpoint.enable_checkpoint", "--checkpoint.create_seed_checkpoint",
                "--training.data_parallel_replicate_degree", "1", "--training.data_parallel_shard_degree", "1",
                "--training.tensor_parallel_degree", "1", "--experimental.pipeline_parallel_degree", "1",
                "--experimental.context_parallel_degree", "1"]


def _copy_step(src_dump: str, step: int, dst_dump: str) -> None:
    shutil.copytree(os.path.join(src_dump, "checkpoint", f"step-{step}"),
                    os.path.join(dst_dump, "checkpoint", f"step-{step}"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = str(tmp_path_factory.mktemp("reshard"))
    seed_dump = os.path.join(tmp, "seed")
    env = launch._env({"NGPU": "1", "CONFIG": launch.DEBUG_CONFIG, "PYTHON": sys.executable})
    proc = subprocess.run(["./run_train.sh", *SEED_COMMAND, "--job.dump_folder", seed_dump], cwd=launch.ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seed = os.path.join(seed_dump, "checkpoint", "step-0")
    out = {"seed_listing": sorted(os.listdir(seed_dump)), "seed_files": sorted(os.listdir(seed))}
    hf_dir = os.path.join(tmp, "hf")
    make_tiny_hf(hf_dir)
    from_hf = ["--training.steps", "1", "--checkpoint.initial_load_path", hf_dir]

    w4 = run_layouts(tmp, 4, COMMON, {"ref": ["--training.local_batch_size", "1",
                                              "--checkpoint.initial_load_path", seed]}, "w4")
    for name in ("w2", "w1"):
        _copy_step(seed_dump, 0, os.path.join(tmp, name, "seed"))
    _copy_step(os.path.join(tmp, "w4", "ref"), 2, os.path.join(tmp, "w2", "resume"))
    w2 = run_layouts(tmp, 2, COMMON, {"seed": ["--training.local_batch_size", "2", "--training.steps", "1"],
                                      "resume": ["--training.local_batch_size", "2",
                                                 "--checkpoint.async_mode", "async"],
                                      "hf": ["--training.local_batch_size", "2", *from_hf]},
                     "w2")
    _copy_step(os.path.join(tmp, "w2", "resume"), 4, os.path.join(tmp, "w1", "resume"))
    w1 = run_layouts(tmp, 1, COMMON, {"seed": ["--training.local_batch_size", "4", "--training.steps", "1"],
                                      "resume": ["--training.local_batch_size", "4"],
                                      "hf": ["--training.local_batch_size", "4", *from_hf]}, "w1")
    out.update({"ref": w4["ref"], "seed2": w2["seed"], "resume2": w2["resume"], "seed1": w1["seed"],
                "resume1": w1["resume"],
                "hf2": w2["hf"], "hf1": w1["hf"]})
    return out


# The per-token losses summed per rank and then across ranks, instead of all in one sum, move the last bits
# of a float32 loss near 8 (one ulp is 4.8e-7): a few ulps, in one process as well when a batch is summed in
# halves. A wrong shard or a missed weight moves it by more than 1e-3.
SUM_ORDER = 1e-5


def test_seed_command_writes_step0_and_exits(runs):
    assert runs["seed_listing"] == ["checkpoint"]  # no metrics: it did not train
    assert ".complete" in runs["seed_files"] and ".metadata" in runs["seed_files"]


def test_seed_loaded_by_1_2_and_4_processes_gives_the_same_step1_loss(runs):
    l1, l2, l4 = runs["seed1"]["loss"][0], runs["seed2"]["loss"][0], runs["ref"]["loss"][0]
    print(f"step-1 loss from the seed: 1 proc {l1!r}, 2 procs {l2!r}, 4 procs {l4!r}")
    assert len(runs["seed1"]["loss"]) == len(runs["seed2"]["loss"]) == 1
    assert abs(l1 - l2) <= SUM_ORDER and abs(l1 - l4) <= SUM_ORDER


def test_resume_on_fewer_processes_continues_the_same_run(runs):
    ref = runs["ref"]["loss"]
    assert len(ref) == 6
    r2, r1 = runs["resume2"]["loss"], runs["resume1"]["loss"]
    assert len(r2) == 4 and len(r1) == 2  # steps 3-6 and 5-6: the step counter came from the checkpoint
    diffs = [abs(a - b) for a, b in zip(r2, ref[2:])] + [abs(a - b) for a, b in zip(r1, ref[4:])]
    print(f"4 -> 2 -> 1 processes: max |loss - reference| = {max(diffs):.2e}")
    assert max(diffs) <= 1e-5, (ref, r2, r1)


def test_hf_initial_load_under_fsdp_matches_one_process(runs):
    l1, l2 = runs["hf1"]["loss"][0], runs["hf2"]["loss"][0]
    assert abs(l1 - l2) <= SUM_ORDER and abs(l1 - runs["seed1"]["loss"][0]) > 1e-3  # HF weights, not the seed's


# ------------------------------------------------------------------ expert parallel: EP2 -> EP1 -> EP4
MOE_COMMON = [*launch.TINY, "--training.steps", "3", "--checkpoint.keep_latest_k", "0",
              "--checkpoint.last_save_model_only", "false", "--comm.train_timeout_seconds", "60"]
# name -> (processes, expert parallel degree); dp_shard takes every process
MOE_LAYOUTS = {"ep2": (2, 2), "ep1": (1, 1), "ep4": (4, 4), "ep2_efsdp2": (4, 2)}


def _ep(name: str) -> list[str]:
    world, ep = MOE_LAYOUTS[name]
    return ["--parallelism.expert_parallel_degree", str(ep), "--training.local_batch_size", str(4 // world)]


def _comparable(state: dict) -> dict:
    """The data position without the dp degree that wrote it (recorded for information, rightly different)."""
    loader = pickle.loads(state["dataloader"]["state"])
    return {**state, "dataloader": {"loader": pickle.dumps(loader["loader"])}}


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> dict:
    tmp = str(tmp_path_factory.mktemp("moe_reshard"))
    dumps = {name: os.path.join(tmp, name) for name in MOE_LAYOUTS}
    launch.run_train(dumps["ep2"], [*MOE_COMMON, "--checkpoint.enable_checkpoint", "--checkpoint.interval", "2",
                                    *_ep("ep2")], nproc=2, config=MOE_CONFIG)
    steps = {"ep2": os.path.join(dumps["ep2"], "checkpoint", "step-2")}
    for src, name in (("ep2", "ep1"), ("ep1", "ep4"), ("ep4", "ep2_efsdp2")):
        steps[name] = resave_in_layout(steps[src], dumps[name], [*MOE_COMMON, *_ep(name)], MOE_LAYOUTS[name][0],
                                       MOE_CONFIG)
    steps["ep2 step-3"] = os.path.join(dumps["ep2"], "checkpoint", "step-3")
    return {"states": {name: read_dcp(path, os.path.join(tmp, f"{name}.pt")) for name, path in steps.items()},
            "markers": {name: read_marker(path) for name, path in steps.items()},
            "metrics": {name: {r["step"]: r for r in launch.read_metrics(dump)} for name, dump in dumps.items()}}


def test_moe_checkpoint_reshards_ep2_to_ep1_to_ep4_bitwise(moe):
    states = {name: _comparable(state) for name, state in moe["states"].items()}
    assert {name: moe["markers"][name]["world_size"] for name in MOE_LAYOUTS} == {
        name: world for name, (world, _) in MOE_LAYOUTS.items()}
    assert {int(s["train_state"]["step"]) for s in states.values()} == {2, 3}
    model, optim = states["ep2"]["model"], states["ep2"]["optimizer"]
    assert model["layers.0.feed_forward.experts.w1"].shape[0] == 8  # (E, out, in), whole
    assert optim["state.layers.0.feed_forward.experts.w1.exp_avg"].abs().sum() > 0  # trained, not init
    assert set(states["ep2"]) == {"model", "optimizer", "lr_scheduler", "dataloader", "train_state"}
    n = len(model) + sum(1 for k in optim if k.startswith("state."))
    ep1 = bitwise_differences(states["ep2"], states["ep1"])
    ep4 = bitwise_differences(states["ep1"], states["ep4"])
    efsdp = bitwise_differences(states["ep4"], states["ep2_efsdp2"])
    print(f"EP2 -> EP1 -> EP4 -> EP2 x efsdp 2: {n} model and optimizer tensors; differences {len(ep1)}, "
          f"{len(ep4)}, {len(efsdp)}")
    assert ep1 == [] and ep4 == [] and efsdp == [], (ep1[:5], ep4[:5], efsdp[:5])
    # The comparison sees a wrong step: the next step's save differs in weights, moments and step counts.
    wrong = bitwise_differences(states["ep2"], states["ep2 step-3"])
    for key in ("model.layers.0.feed_forward.experts.w2", "train_state.step",
                "optimizer.state.layers.0.feed_forward.experts.w2.exp_avg_sq"):
        assert any(d.startswith(key + ":") for d in wrong), (key, wrong[:5])


def test_moe_step_after_reshard_matches_the_uninterrupted_run(moe):
    metrics = moe["metrics"]
    assert metrics["ep2"].keys() == {1, 2, 3}
    assert metrics["ep1"].keys() == metrics["ep4"].keys() == metrics["ep2_efsdp2"].keys() == {3}
    keys = ("loss", "grad_norm", "load_balance_loss", "router_z_loss")
    diffs = {name: max(abs(metrics[name][3][k] - metrics["ep2"][3][k]) for k in keys)
             for name in ("ep1", "ep4", "ep2_efsdp2")}
    print(f"step 3 after EP2 -> EP1 -> EP4: max |{', '.join(keys)} - EP2's| = {diffs}")
    assert max(diffs.values()) <= 1e-5, {name: [m[3][k] for k in keys] for name, m in metrics.items()}
