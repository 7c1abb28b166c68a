"""Pipeline stages (distributed/pipeline.py) without processes: how layers split into stages and where the stages
go, what a stage plan refuses, and what a pruned stage keeps. Training under PP is compared with one process in
tests/integration/test_pipeline_parity.py."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.pipeline_helpers import CSV_ROWS, pp_cfg
from torchtitan.config.manager import ConfigError
from torchtitan.distributed.pipeline import even_layer_counts, plan_stages, prune_to_stage
from torchtitan.models import get_train_spec
from torchtitan.models.olmo3 import olmo3_flavors


def test_even_split_gives_middle_stages_the_extra_layers():
    # 405B: 126 layers over 16 stages; the first and last stage also hold the embedding and output.
    counts = even_layer_counts(126, 16)
    assert sum(counts) == 126 and counts[0] == counts[-1] == 7 and set(counts[1:-1]) == {8}
    assert even_layer_counts(6, 4) == [1, 2, 2, 1]


@pytest.mark.parametrize("schedule,ranks", [("1F1B", [0, 1]), ("GPipe", [0, 1]), ("Interleaved1F1B", [0, 1, 0, 1]),
                                            ("LoopedBFS", [0, 1, 0, 1]), ("ZBVZeroBubble", [0, 1, 1, 0]),
                                            ("DualPipeV", [0, 1, 1, 0])])
def test_default_stage_placement(schedule, ranks):
    plan = plan_stages(pp_cfg(pipeline_parallel_schedule=schedule).parallelism, 6)
    assert plan.stage_ranks == ranks
    assert [layer for stage in plan.layers for layer in stage] == [str(i) for i in range(6)]


def test_split_points_and_layers_per_stage():
    plan = plan_stages(pp_cfg(pipeline_parallel_split_points=["layers.2"]).parallelism, 6)
    assert plan.layers == [["0", "1"], ["2", "3", "4", "5"]]
    plan = plan_stages(pp_cfg(pipeline_parallel_schedule="Interleaved1F1B",
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
        plan_stages(pp_cfg(**settings).parallelism, 6)


def test_csv_schedule_places_stages_where_its_rows_run_them(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("\n".join(CSV_ROWS) + "\n")
    csv = pp_cfg(pipeline_parallel_schedule="CSV", pipeline_parallel_schedule_csv=str(path)).parallelism
    assert plan_stages(csv, 6).stage_ranks == [0, 1, 0, 1]
    path.write_text(CSV_ROWS[0] + "\n")
    with pytest.raises(ConfigError, match="1 rows but pipeline_parallel_degree = 2"):
        plan_stages(csv, 6)


def test_each_layer_gets_its_rope_table_on_every_pipeline_stage():
    args = dataclasses.replace(olmo3_flavors["debugmodel"], max_seq_len=256)
    model = get_train_spec("olmo3").build_model(args)
    model.init_weights(buffer_device="cpu", seed=0)
    assert not torch.equal(model.rope_cache, model.plain_rope_cache)
    assert [model.layer_rope(i) is model.rope_cache for i in range(4)] == [False, False, False, True]
    tokens = torch.randint(0, args.vocab_size, (2, 160))  # past the window (64) and the original length (64)
    with torch.no_grad():
        want = model(tokens)
        # Stage 0 holds only sliding layers, stage 1 a sliding and the full one.
        first, last = prune_to_stage(model, ["0", "1"], True, False), prune_to_stage(model, ["2", "3"], False, True)
        assert torch.equal(last(first(tokens)), want)


def test_a_tied_models_last_stage_draws_its_output_as_the_embedding():
    """Gemma 3 ties its output to its embedding; a pipeline's last stage holds the output alone, and a fresh
    init (no seed checkpoint) must give it the single-process model's embedding, bit for bit."""
    spec = get_train_spec("gemma3")
    args = spec.model_args("debugmodel")
    args.max_seq_len = 64
    with torch.device("meta"):
        model = spec.build_model(args)
    whole = spec.build_model(args)
    whole.init_weights(buffer_device="cpu", seed=7)
    last = prune_to_stage(model, ["4", "5"], is_first=False, is_last=True)
    last.to_empty(device="cpu")
    last.init_weights(buffer_device="cpu", seed=7)
    assert last.tok_embeddings is None and not last.is_tied
    assert torch.equal(last.output.weight, whole.tok_embeddings.weight)
    assert torch.equal(last.layers["5"].attention.wq.weight, whole.layers["5"].attention.wq.weight)
