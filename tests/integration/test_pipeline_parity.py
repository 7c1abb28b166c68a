"""Pipeline parallel reproduces single-process training: every schedule, and PP composed with FSDP, TP and CP.

Every run starts from one seed checkpoint, trains the debug model in float32 for
5 steps and must match the single-process loss of every step and the first
step's gradient norm within 1e-5 (later norms drift with Adam; see docs/debugging.md,
"torch.distributed on CPU (gloo): what works and what does not"). Layouts are grouped into one torchrun launch per world
size (parity_driver.py), since a launch costs more than a 5-step run.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.launch import DEBUG_CONFIG, TINY, make_seed_checkpoint, run_parity_driver
from torchtitan.config.job_config import JobConfig
from torchtitan.config.manager import ConfigError
from torchtitan.distributed import pipeline
from torchtitan.distributed.pipeline import V_SCHEDULES, check_pipeline_config, even_layer_counts, plan_stages
from torchtitan.models.llama3 import llama3_flavors
from torchtitan.trainer.plan import make_plan

TOL = 1e-5
PP = ["--parallelism.pipeline_parallel_degree", "2"]
DOCS = ["--training.document_masking", "--training.document_rope_restart"]


def _schedule(name: str) -> list[str]:
    return [*PP, "--parallelism.pipeline_parallel_schedule", name]


# 4 stages over 2 ranks, placed round-robin (rank 0: stages 0 and 2), 4 micro-batches.
# Rank 0 runs breadth-first; rank 1 alternates forward and backward on the last stage.
CSV_ROWS = [
    "0F0,0F1,0F2,0F3,2F0,2F1,2F2,2F3,2B0,2B1,2B2,2B3,0B0,0B1,0B2,0B3",
    "1F0,1F1,1F2,1F3,3F0,3B0,3F1,3B1,3F2,3B2,3F3,3B3,1B0,1B1,1B2,1B3",
]

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
# torch < 2.12 cannot run V schedules over gloo (preflight says so; see test_v_schedules_on_old_torch_gloo).
V_UNSUPPORTED = pipeline._warmup_sends_to_self()
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


# ---------------------------------------------------------------- stage planning (no processes, milliseconds)
def _cfg(**parallelism) -> JobConfig:
    cfg = JobConfig()
    cfg.parallelism.pipeline_parallel_degree = 2
    for key, value in parallelism.items():
        setattr(cfg.parallelism, key, value)
    return cfg


def test_even_split_gives_middle_stages_the_extra_layers():
    # 405B: 126 layers over 16 stages; the first and last stage also hold the embedding and output.
    counts = even_layer_counts(126, 16)
    assert sum(counts) == 126 and counts[0] == counts[-1] == 7 and set(counts[1:-1]) == {8}
    assert even_layer_counts(6, 4) == [1, 2, 2, 1]


@pytest.mark.parametrize("schedule,ranks", [("1F1B", [0, 1]), ("GPipe", [0, 1]), ("Interleaved1F1B", [0, 1, 0, 1]),
                                            ("LoopedBFS", [0, 1, 0, 1]), ("ZBVZeroBubble", [0, 1, 1, 0]),
                                            ("DualPipeV", [0, 1, 1, 0])])
def test_default_stage_placement(schedule, ranks):
    plan = plan_stages(_cfg(pipeline_parallel_schedule=schedule).parallelism, 6)
    assert plan.stage_ranks == ranks
    assert [layer for stage in plan.layers for layer in stage] == [str(i) for i in range(6)]


def test_split_points_and_layers_per_stage():
    plan = plan_stages(_cfg(pipeline_parallel_split_points=["layers.2"]).parallelism, 6)
    assert plan.layers == [["0", "1"], ["2", "3", "4", "5"]]
    plan = plan_stages(_cfg(pipeline_parallel_schedule="Interleaved1F1B",
                            pipeline_parallel_layers_per_stage=2).parallelism, 8)
    assert plan.num_stages == 4 and plan.stages_of(1) == [1, 3]


@pytest.mark.parametrize("settings,message", [
    (dict(pipeline_parallel_split_points=["layers.9"]), "0 < K < 6"),
    (dict(pipeline_parallel_split_points=["layers.4", "layers.2"]), "strictly increasing"),
    (dict(pipeline_parallel_split_points=["layers.1", "layers.2"]), "exactly pipeline_parallel_degree = 2"),
    (dict(pipeline_parallel_schedule="ZBVZeroBubble", pipeline_parallel_layers_per_stage=3),
     "exactly 2 stages per rank"),
    (dict(pipeline_parallel_layers_per_stage=4), "must divide"),
    (dict(pipeline_parallel_schedule="CSV"), "pipeline_parallel_schedule_csv"),
    (dict(pipeline_parallel_schedule="PipelineScheduleSingle"), "cannot run"),
])
def test_bad_stage_plans_name_the_key(settings, message):
    with pytest.raises(ConfigError, match=message):
        plan_stages(_cfg(**settings).parallelism, 6)


def test_csv_schedule_places_stages_where_its_rows_run_them(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("\n".join(CSV_ROWS) + "\n")
    plan = plan_stages(_cfg(pipeline_parallel_schedule="CSV", pipeline_parallel_schedule_csv=str(path)).parallelism, 6)
    assert plan.stage_ranks == [0, 1, 0, 1]
    path.write_text(CSV_ROWS[0] + "\n")
    with pytest.raises(ConfigError, match="1 rows but pipeline_parallel_degree = 2"):
        plan_stages(_cfg(pipeline_parallel_schedule="CSV", pipeline_parallel_schedule_csv=str(path)).parallelism, 6)


@pytest.mark.parametrize("schedule,batch,compile_on,message", [
    ("DualPipeV", 2, False, "at least as many micro-batches as stages"),
    ("Interleaved1F1B", 5, False, "use a multiple of 2"),
    ("ZBVZeroBubble", 4, True, "compile.enable = false"),
])
def test_schedule_constraints_fail_in_preflight(schedule, batch, compile_on, message):
    cfg = _cfg(pipeline_parallel_schedule=schedule)
    cfg.training.local_batch_size, cfg.compile.enable = batch, compile_on
    with pytest.raises(ConfigError, match=message):
        _check(cfg)
    with pytest.raises(ConfigError, match=message):
        make_plan(cfg, 2)


def _check(cfg, on_cpu: bool = False) -> None:
    check_pipeline_config(cfg.parallelism, llama3_flavors["debugmodel"], local_batch_size=cfg.training.local_batch_size,
                          compiled=cfg.compile.enable, on_cpu=on_cpu, model_label="llama3 debugmodel")


def test_v_schedules_on_old_torch_gloo_fail_in_preflight(monkeypatch):
    """torch < 2.12 opens pipeline links with a send to the same rank, which gloo cannot do: say so up front."""
    monkeypatch.setattr(pipeline, "_warmup_sends_to_self", lambda: True)
    cfg = _cfg(pipeline_parallel_schedule="ZBVZeroBubble")
    cfg.training.local_batch_size = 4
    with pytest.raises(ConfigError, match="ZBVZeroBubble puts neighbouring stages on one rank.*torch >= 2.12"):
        _check(cfg, on_cpu=True)
    _check(cfg, on_cpu=False)  # NCCL sends to the same rank
    cfg.parallelism.pipeline_parallel_schedule = "Interleaved1F1B"
    _check(cfg, on_cpu=True)
