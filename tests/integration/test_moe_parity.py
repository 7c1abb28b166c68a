"""Every MoE layout reproduces single-process training of OLMoE's debug model (CPU, gloo, fp32, real processes).

All runs start from one seed checkpoint of train_configs/olmoe_debug.toml with the balance losses on
(load balancing 0.01, z-loss 0.001) and see the same global batch (4 x 64 tokens). The losses are over the
global batch, so every layout optimizes the same objective: per-step LM losses, the first gradient norm,
the validation losses and the logged balance losses must agree within 1e-5. The accumulation and pipeline
layouts have several micro-batches per rank, so they also prove the routing pass (trainer/balance.py).
One parity_driver.py launch per world size.
"""
from __future__ import annotations

import os

import pytest

from tests import launch

MOE_CONFIG = os.path.join(launch.ROOT, "train_configs", "olmoe_debug.toml")
TOL = 1e-5
FSDP = ["--parallelism.data_parallel_shard_degree", "-1"]


def _bs(n: int) -> list[str]:
    return ["--training.local_batch_size", str(n), "--validation.local_batch_size", str(n)]


def _ep(n: int) -> list[str]:
    return ["--parallelism.expert_parallel_degree", str(n)]


TP2 = ["--parallelism.tensor_parallel_degree", "2"]
CP2 = ["--parallelism.context_parallel_degree", "2"]
PP2 = ["--parallelism.pipeline_parallel_degree", "2"]

# name -> (world size, CLI overrides)
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "single": (1, _bs(4)),
    "fsdp2": (2, FSDP + _bs(2)),  # experts FSDP-sharded on their first dim, no EP
    "tp2": (2, TP2 + _bs(4)),  # MoE on each rank's sequence shard, partial gradients summed without FSDP
    "ep2": (2, FSDP + _bs(2) + _ep(2)),
    # Two micro-batches per rank: the expert counts of both fix the loss before the first backward.
    "ep2_accum2": (2, FSDP + _ep(2) + ["--training.local_batch_size", "1", "--validation.local_batch_size", "2",
                                       "--training.global_batch_size", "4"]),
    "ep2_full_ac": (2, FSDP + _bs(2) + _ep(2) + ["--activation_checkpoint.mode", "full"]),
    "ep2_tp2": (4, FSDP + _bs(2) + _ep(2) + TP2),
    "ep2_pp2": (4, FSDP + _bs(2) + _ep(2) + PP2),
    "ep4": (4, FSDP + _bs(1) + _ep(4)),
    "ep2_cp2": (4, FSDP + _bs(2) + _ep(2) + CP2),
    # Compiled blocks, the dispatch left eager (compiled kernels round differently: COMPILE_TOL).
    "ep2_compile": (2, FSDP + _bs(2) + _ep(2) + ["--compile.enable"]),
}
COMPILE_TOL = 1e-4
COMPARED = [name for name in LAYOUTS if name != "single"]


def _common(seed: str) -> list[str]:
    return ["--job.config_file", MOE_CONFIG, *launch.TINY,
            "--checkpoint.enable", "--checkpoint.initial_load_path", seed, "--metrics.enable_jsonl=false",
            "--comm.init_timeout_seconds", "120", "--comm.train_timeout_seconds", "60",
            "--validation.enable", "--validation.freq", "2", "--validation.steps", "2", "--validation.seq_len", "64"]


@pytest.fixture(scope="module")
def parity(tmp_path_factory) -> dict:
    tmp = str(tmp_path_factory.mktemp("moe_parity"))
    launch.run_train(os.path.join(tmp, "seed"), ["--checkpoint.enable_checkpoint",
                                                 "--checkpoint.create_seed_checkpoint", "--training.seq_len", "64"],
                     config=MOE_CONFIG)
    seed = os.path.join(tmp, "seed", "checkpoint", "step-0")
    results: dict = {"_errors": []}
    for world in (1, 2, 4):
        layouts = {name: args for name, (w, args) in LAYOUTS.items() if w == world}
        out, errors = launch.run_parity_world(tmp, world, _common(seed), layouts)
        results["_errors"] += errors
        results.update(out)
    lines = ["layout         max|dloss|  |dgradnorm1|  max|dval|  max|dlb|   max|dz|   seconds"]
    for name in COMPARED:
        if name in results and "single" in results:
            d = _diffs(results, name)
            lines.append(f"{name:<14} {d['loss']:9.2e}  {d['grad_norm']:11.2e}  {d['val']:9.2e}  {d['lb']:8.2e}  "
                         f"{d['z']:8.2e}  {results[name]['seconds']:7.1f}")
    print("\n" + "\n".join(lines))
    return results


def _maxdiff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) for x, y in zip(a, b))


def _diffs(results: dict, name: str) -> dict[str, float]:
    got, ref = results[name], results["single"]
    return {"loss": _maxdiff(got["loss"], ref["loss"]), "grad_norm": abs(got["grad_norm"][0] - ref["grad_norm"][0]),
            "val": _maxdiff(got["validation_loss"], ref["validation_loss"]),
            "lb": _maxdiff(got["load_balance_loss"], ref["load_balance_loss"]),
            "z": _maxdiff(got["router_z_loss"], ref["router_z_loss"])}


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPARED)
def test_moe_layout_matches_single_process(parity: dict, name: str):
    if name not in parity or "single" not in parity:
        pytest.fail(f"{name} did not run:\n" + "\n".join(parity["_errors"]))
    d = _diffs(parity, name)
    tol = COMPILE_TOL if "compile" in name else TOL
    assert max(d.values()) <= tol, f"{name}: {d}\n{parity[name]}\nreference {parity['single']}"


@pytest.mark.slow
def test_moe_reference_trains_and_balances(parity: dict):
    """Guards against vacuous parity: the reference learns, and the balance losses are logged and live."""
    ref = parity["single"]
    assert ref["loss"][-1] < ref["loss"][0] - 0.2, ref["loss"]
    # 4 MoE layers, each E x sum f P (1 when perfectly balanced).
    assert all(3.0 < v < 32.0 for v in ref["load_balance_loss"]), ref["load_balance_loss"]
    assert all(v > 0 for v in ref["router_z_loss"]), ref["router_z_loss"]
