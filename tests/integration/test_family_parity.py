"""Every family added on the decoder's seams reproduces single-process training under each parallelism.

From one seed checkpoint of each family's debug config (train_configs/<family>_debug.toml), FSDP2, TP2, PP2
and CP2 (and, for the MoE families, EP2 and EP2 x TP2) train 4 steps on the same global batch (4 x 64
tokens) and must match the one-process run within 1e-5 in every step's loss, the first gradient norm and the
validation losses (steps 2 and 4).
The MoE families run with their balance losses on. Gemma 3 ties its output to its embedding: under PP2 the two
copies on the first and last stage are kept equal (distributed/pipeline.py). All families share one
parity_driver.py launch per world size (1, 2, 4).
"""
from __future__ import annotations

import os

import pytest

from tests import launch

TOL = 1e-5
# name -> has experts
FAMILIES = {"qwen3": False, "qwen3_moe": True, "gemma3": False, "gpt_oss": True, "deepseek_v3": True}
FSDP = ["--parallelism.data_parallel_shard_degree", "-1"]
TP2 = ["--parallelism.tensor_parallel_degree", "2"]
CP2 = ["--parallelism.context_parallel_degree", "2"]
PP2 = ["--parallelism.pipeline_parallel_degree", "2"]
EP2 = ["--parallelism.expert_parallel_degree", "2"]


def _bs(n: int) -> list[str]:
    return ["--training.local_batch_size", str(n), "--validation.local_batch_size", str(n)]


# layout -> (world size, CLI overrides, only for MoE families)
LAYOUTS: dict[str, tuple[int, list[str], bool]] = {
    "single": (1, _bs(4), False),
    "fsdp2": (2, FSDP + _bs(2), False),
    "tp2": (2, TP2 + _bs(4), False),
    "pp2": (2, PP2 + _bs(4), False),
    "cp2": (2, CP2 + _bs(4), False),
    "ep2": (2, FSDP + EP2 + _bs(2), True),
    "ep2_tp2": (4, FSDP + EP2 + TP2 + _bs(2), True),
}
def _runs(family: str, name: str) -> bool:
    _, _, moe_only = LAYOUTS[name]
    return FAMILIES[family] or not moe_only


CASES = [(f, name) for f in FAMILIES for name in LAYOUTS if name != "single" and _runs(f, name)]
COMMON = [*launch.TINY, "--training.steps", "4", "--metrics.enable_jsonl=false", "--checkpoint.enable",
          "--comm.init_timeout_seconds", "120", "--comm.train_timeout_seconds", "60",
          # Validation at steps 2 and 4 on 2 global batches of held-out windows.
          "--validation.enable", "--validation.freq", "2", "--validation.steps", "2", "--validation.seq_len", "64"]


def _config(family: str) -> str:
    return os.path.join(launch.ROOT, "train_configs", f"{family}_debug.toml")


@pytest.fixture(scope="module")
def parity(tmp_path_factory) -> dict:
    tmp = str(tmp_path_factory.mktemp("family_parity"))
    seeds = {}
    for family in FAMILIES:
        launch.run_train(os.path.join(tmp, f"seed-{family}"), ["--checkpoint.enable_checkpoint",
                                                               "--checkpoint.create_seed_checkpoint",
                                                               "--training.seq_len", "64"], config=_config(family))
        seeds[family] = os.path.join(tmp, f"seed-{family}", "checkpoint", "step-0")
    results: dict = {"_errors": []}
    for world in (1, 2, 4):
        layouts = {f"{family}/{name}": ["--job.config_file", _config(family), "--checkpoint.initial_load_path",
                                        seeds[family], *args]
                   for family in FAMILIES for name, (w, args, _) in LAYOUTS.items()
                   if w == world and _runs(family, name)}
        results.setdefault("_dump_roots", {})[world] = os.path.join(tmp, f"runs{world}")
        spec = {"common": COMMON, "dump_root": results["_dump_roots"][world],
                "layouts": {k.replace("/", "-"): v for k, v in layouts.items()}}
        proc, out = launch.run_parity_driver(world, spec, os.path.join(tmp, f"spec{world}.json"),
                                             os.path.join(tmp, f"out{world}.json"))
        if proc.returncode != 0:
            missing = sorted(set(spec["layouts"]) - set(out))
            results["_errors"].append(f"world {world} failed ({proc.returncode}) before {missing}:\n"
                                      f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        results.update(out)
    lines = ["layout                max|dloss|   |dgradnorm1|"]
    for family, name in CASES:
        got, ref = results.get(f"{family}-{name}"), results.get(f"{family}-single")
        if got and ref:
            loss = max(abs(a - b) for a, b in zip(got["loss"], ref["loss"]))
            gn = abs(got["grad_norm"][0] - ref["grad_norm"][0])
            lines.append(f"{family + '/' + name:<20}  {loss:10.2e}   {gn:10.2e}")
    print("\n" + "\n".join(lines))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("family,name", CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_layout_matches_single_process(parity: dict, family: str, name: str):
    key, ref_key = f"{family}-{name}", f"{family}-single"
    if key not in parity or ref_key not in parity:
        pytest.fail(f"{key} did not run:\n" + "\n".join(parity["_errors"]))
    got, ref = parity[key], parity[ref_key]
    assert len(got["loss"]) == len(ref["loss"]) == 4, got["loss"]
    loss = max(abs(a - b) for a, b in zip(got["loss"], ref["loss"]))
    assert loss <= TOL, f"{key}: losses {got['loss']} vs {ref['loss']} (max diff {loss:.2e})"
    gn = abs(got["grad_norm"][0] - ref["grad_norm"][0])
    assert gn <= TOL, f"{key}: first grad norm {got['grad_norm'][0]} vs {ref['grad_norm'][0]}"
    for k in ("validation_loss", "load_balance_loss"):
        if k in ref:
            assert len(got[k]) == len(ref[k]) > 0, (k, got[k])
            diff = max(abs(a - b) for a, b in zip(got[k], ref[k]))
            assert diff <= TOL, f"{key}: {k} {got[k]} vs {ref[k]}"


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_reference_learns(parity: dict, family: str):
    """Guards against vacuous parity: the one-process run's loss falls over its 4 steps."""
    losses = parity[f"{family}-single"]["loss"]
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.slow
def test_tied_copies_stay_equal_under_pipeline_parallel(parity: dict):
    """Gemma 3's PP2 run: the embedding (first stage) and the output (last stage) saved in its final checkpoint
    are the same bits after 4 AdamW steps (their gradients are summed, so they take the same steps)."""
    import torch

    from torchtitan.checkpoint.io import load_model_from_dcp, model_shapes, read_dcp_metadata

    step = os.path.join(parity["_dump_roots"][2], "gemma3-pp2", "checkpoint", "step-4")
    shapes = model_shapes(read_dcp_metadata(step))
    state = {k: torch.empty(tuple(shapes[k][0]), dtype=shapes[k][1]) for k in ("tok_embeddings.weight",
                                                                                "output.weight")}
    load_model_from_dcp(step, state, piece=True)
    assert torch.equal(state["tok_embeddings.weight"], state["output.weight"])
