"""Pipeline parallel reproduces single-process training: every schedule, and PP composed with FSDP, TP and CP.

Every run starts from one seed checkpoint, trains the debug model in float32 for
5 steps and must match the single-process loss of every step and the first
step's gradient norm within 1e-5 (later norms drift with Adam; see docs/debugging.md,
"torch.distributed on CPU (gloo): what works and what does not"). Layouts are
grouped into one torchrun launch per world size (parity_driver.py), since a
launch costs more than a 5-step run. Stage planning, without processes, is tested
in tests/unit/distributed/test_pipeline.py, the schedule checks in
tests/unit/trainer/test_checks.py.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.launch import DEBUG_CONFIG, TINY, make_seed_checkpoint, run_parity_driver
from tests.pipeline_helpers import CSV_ROWS
from torchtitan.distributed import pipeline
from torchtitan.distributed.pipeline import V_SCHEDULES

TOL = 1e-5
PP = ["--parallelism.pipeline_parallel_degree", "2"]
DOCS = ["--training.document_masking", "--training.document_rope_restart"]


def _schedule(name: str) -> list[str]:
    return [*PP, "--parallelism.pipeline_parallel_schedule", name]


# The single-process reference sees 4 sequences a step; layouts with dp = 2 take 2 each.
WORLD_2 = {
    "GPipe": _schedule("GPipe"),
    "1F1B": _schedule("1F1B"),
    "Interleaved1F1B": _schedule("Interleaved1F1B"),
    "LoopedBFS": _schedule("LoopedBFS"),
    "InterleavedZeroBubble": _schedule("InterleavedZeroBubble"),
    "ZBVZeroBubble": _schedule("ZBVZeroBubble"),
    "DualPipeV": _schedule("DualPipeV"),
    "CSV": _schedule("CSV"),  # + the CSV path, added once the file exists
    "1F1B_split_points": [*_schedule("1F1B"), "--parallelism.pipeline_parallel_split_points", "layers.2"],
    "1F1B_fused_loss": [*_schedule("1F1B"), "--training.loss_chunk_size", "48", "--training.fused_output_loss"],
}
WORLD_4 = {
    "PP2xFSDP2_Interleaved1F1B": [*_schedule("Interleaved1F1B"), "--parallelism.data_parallel_shard_degree", "2",
                                  "--training.local_batch_size", "2"],
    "PP2xTP2_1F1B": [*_schedule("1F1B"), "--parallelism.tensor_parallel_degree", "2"],
    "PP2xCP2_Interleaved1F1B": [*_schedule("Interleaved1F1B"), "--parallelism.context_parallel_degree", "2"],
    # Document ids and per-document positions are split into micro-batches with the inputs.
    "PP2xCP2_1F1B_documents": [*_schedule("1F1B"), "--parallelism.context_parallel_degree", "2", *DOCS],
}
WORLD_8 = {
    "PP2xFSDP2xTP2_1F1B": [*_schedule("1F1B"), "--parallelism.data_parallel_shard_degree", "2",
                           "--parallelism.tensor_parallel_degree", "2", "--training.local_batch_size", "2"],
}
# torch < 2.12 cannot run V schedules over gloo (the config checks say so; see
# test_v_schedules_on_old_torch_gloo_fail_in_preflight in tests/unit/trainer/test_checks.py).
V_UNSUPPORTED = pipeline.warmup_sends_to_self()
GROUPS = {1: {"reference": [], "reference_documents": DOCS}, 2: WORLD_2, 4: WORLD_4, 8: WORLD_8}
LAYOUTS = [(n, name) for n in (2, 4, 8) for name in GROUPS[n]]


def _launch(nproc: int, layouts: dict, common: list[str], root: str) -> dict:
    spec = {"common": common, "layouts": layouts, "dump_root": os.path.join(root, f"world{nproc}")}
    proc, results = run_parity_driver(nproc, spec, os.path.join(root, f"spec_{nproc}.json"),
                                      os.path.join(root, f"out_{nproc}.json"), timeout=120 + 60 * len(layouts))
    if proc.returncode != 0:
        results["__error__"] = f"launch of {nproc} ranks failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{world size: {layout: {"loss": [...], "grad_norm": [...]}}}, launched lazily once per world size."""
    root = str(tmp_path_factory.mktemp("pp_parity"))
    seed = make_seed_checkpoint(os.path.join(root, "seed"))
    csv_path = os.path.join(root, "schedule.csv")
    with open(csv_path, "w") as f:
        f.write("\n".join(CSV_ROWS) + "\n")
    common = ["--job.config_file", DEBUG_CONFIG, *TINY, "--comm.init_timeout_seconds", "60", "--checkpoint.enable",
              "--checkpoint.initial_load_path", seed, "--checkpoint.interval", "1000"]
    groups = {n: dict(g) for n, g in GROUPS.items()}
    groups[2]["CSV"] = [*groups[2]["CSV"], "--parallelism.pipeline_parallel_schedule_csv", csv_path]
    if V_UNSUPPORTED:
        groups[2] = {k: v for k, v in groups[2].items() if k not in V_SCHEDULES}
    cache: dict = {}

    def get(nproc: int) -> dict:
        if nproc not in cache:
            cache[nproc] = _launch(nproc, groups[nproc], common, root)
        return cache[nproc]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("nproc,layout", LAYOUTS, ids=[name for _, name in LAYOUTS])
def test_pipeline_matches_single_process(runs, nproc, layout):
    if V_UNSUPPORTED and layout in V_SCHEDULES:
        pytest.skip(f"torch {torch.__version__} cannot run {layout} over gloo (it needs torch >= 2.12 on CPU)")
    ref = runs(1).get("reference_documents" if layout.endswith("_documents") else "reference")
    assert ref, runs(1).get("__error__", "reference run produced no result")
    got = runs(nproc).get(layout)
    assert got, runs(nproc).get("__error__", f"{layout} produced no result")
    assert len(got["loss"]) == len(ref["loss"]) == 5
    loss_diff = max(abs(a - b) for a, b in zip(got["loss"], ref["loss"]))
    grad_diff = abs(got["grad_norm"][0] - ref["grad_norm"][0])
    print(f"{layout}: max loss diff {loss_diff:.2e}, first grad-norm diff {grad_diff:.2e}")
    assert loss_diff <= TOL, f"{layout} losses {got['loss']} vs single-process {ref['loss']}"
    assert grad_diff <= TOL, f"{layout} first grad norm {got['grad_norm'][0]} vs {ref['grad_norm'][0]}"
