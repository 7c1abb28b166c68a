"""Muon under every sharded layout reproduces single-process Muon (CPU, gloo, fp32, real processes).

Each layout starts from a seed checkpoint and sees the same global batch (4 x 64 tokens), as in
test_parallel_parity.py; here the matrices step with Muon, whose Newton-Schulz runs on the full matrix gathered
from the shards (components/muon.py). Per-step losses over 5 steps and the first gradient norm must agree within
1e-5, also with gradient accumulation (Muon steps once on the accumulated gradient). A checkpoint written under
FSDP2 resumes under TP2 (Muon's momentum and AdamW's moments resharded) with the losses of the uninterrupted FSDP2
run. The OLMoE layouts cover stacked experts (EP2: each rank orthogonalizes its own experts, batched) and the
router on AdamW. One parity_driver.py launch per world size.
"""
from __future__ import annotations

import os

import pytest

from tests import launch

pytestmark = pytest.mark.slow

TOL = 1e-5
MOE_CONFIG = os.path.join(launch.ROOT, "train_configs", "olmoe_debug.toml")
MUON = ["--optimizer.name", "Muon", "--optimizer.lr", "3e-3"]
FSDP = ["--parallelism.data_parallel_shard_degree", "-1"]
TP2 = ["--parallelism.tensor_parallel_degree", "2"]


def _bs(n: int) -> list[str]:
    return ["--training.local_batch_size", str(n)]


GBS4 = ["--training.global_batch_size", "4"]


# Newton-Schulz runs in float32 here (muon_ns_dtype = auto on CPU). In bfloat16 a last-bit difference of a gradient
# between layouts can round an element of the momentum to the neighbouring bfloat16 value, and OLMoE's routing
# amplifies that (1e-4 by step 4); sharded bfloat16 Newton-Schulz is checked bitwise in
# tests/unit/components/test_muon.py.
# name -> (world size, family ("dense" or "moe"), CLI overrides)
LAYOUTS: dict[str, tuple[int, str, list[str]]] = {
    "single": (1, "dense", _bs(4)),
    "moe_single": (1, "moe", _bs(4)),
    "accum2": (1, "dense", _bs(2) + GBS4),  # gradient accumulation: two micro-batches of 2 per step
    "fsdp2": (2, "dense", FSDP + _bs(2) + ["--checkpoint.interval", "3"]),
    "fsdp2_accum2": (2, "dense", FSDP + _bs(1) + GBS4),
    "tp2": (2, "dense", TP2 + _bs(4)),
    "pp2": (2, "dense", ["--parallelism.pipeline_parallel_degree", "2"] + _bs(4)),
    "moe_ep2": (2, "moe", FSDP + _bs(2) + ["--parallelism.expert_parallel_degree", "2"]),
    "moe_fsdp2": (2, "moe", FSDP + _bs(2)),
    "fsdp2_tp2": (4, "dense", FSDP + TP2 + _bs(2)),
    "hsdp2x2": (4, "dense", ["--parallelism.data_parallel_replicate_degree", "2",
                             "--parallelism.data_parallel_shard_degree", "2"] + _bs(1)),
}
REFERENCE = {"dense": "single", "moe": "moe_single"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = str(tmp_path_factory.mktemp("muon"))
    seeds = {"dense": launch.make_seed_checkpoint(os.path.join(tmp, "seed")),
             "moe": launch.make_seed_checkpoint(os.path.join(tmp, "seed_moe"), ["--job.config_file", MOE_CONFIG])}
    common = [*launch.TINY, *MUON, "--checkpoint.enable", "--metrics.enable_jsonl=false",
              "--comm.init_timeout_seconds", "120", "--comm.train_timeout_seconds", "60"]
    results: dict = {"_errors": []}
    for world in (1, 2, 4):
        layouts = {name: ["--job.config_file", launch.DEBUG_CONFIG if fam == "dense" else MOE_CONFIG,
                          "--checkpoint.initial_load_path", seeds[fam], *args]
                   for name, (w, fam, args) in LAYOUTS.items() if w == world}
        if world == 2:  # after fsdp2 (dict order): its step-3 checkpoint, the whole trainer state, under TP2
            step3 = os.path.join(tmp, "runs2", "fsdp2", "checkpoint", "step-3")
            layouts["tp2_resume_from_fsdp2"] = ["--job.config_file", launch.DEBUG_CONFIG, *TP2, *_bs(4),
                                                "--load_path", step3]
        out, errors = launch.run_parity_world(tmp, world, common, layouts)
        results["_errors"] += errors
        results.update(out)
    print("\n" + "\n".join(f"{name:<24} {r['loss']}" for name, r in results.items() if name != "_errors"))
    return results


def _get(runs: dict, name: str) -> dict:
    if name not in runs:
        pytest.fail(f"{name} did not run:\n" + "\n".join(runs["_errors"]))
    return runs[name]


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n not in REFERENCE.values()])
def test_muon_layout_matches_single_process(runs: dict, name: str):
    got, ref = _get(runs, name), _get(runs, REFERENCE[LAYOUTS[name][1]])
    assert len(got["loss"]) == len(ref["loss"]) == 5
    diff = max(abs(a - b) for a, b in zip(got["loss"], ref["loss"]))
    assert diff <= TOL, f"{name}: {got['loss']} vs {ref['loss']} (max diff {diff:.2e})"
    assert abs(got["grad_norm"][0] - ref["grad_norm"][0]) <= TOL


def test_fsdp2_checkpoint_resumes_under_tp2(runs: dict):
    resumed, uninterrupted = _get(runs, "tp2_resume_from_fsdp2"), _get(runs, "fsdp2")
    assert len(resumed["loss"]) == 2  # steps 4 and 5
    diff = max(abs(a - b) for a, b in zip(resumed["loss"], uninterrupted["loss"][3:]))
    assert diff <= TOL, (resumed["loss"], uninterrupted["loss"])


def test_muon_trains(runs: dict):
    """Guards against vacuous parity: Muon moves the loss over the 5 steps."""
    for ref in REFERENCE.values():
        losses = _get(runs, ref)["loss"]
        assert losses[-1] < losses[0] - 0.05, (ref, losses)
