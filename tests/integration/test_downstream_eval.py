"""In-loop downstream evaluation: every layout reports one process's numbers, and they equal scripts/evaluate.py
on the same step's checkpoint.

The learning rate is 0, so the weights stay the (layout-invariant) initialization and the layouts differ only by
float32 reduction order: accuracies must be equal, losses within 1e-5 relative. One launch per world size
(parity_driver.py); Llama 3's debug model under FSDP2, TP2, PP2 and CP2, OLMoE's under EP2.
"""
from __future__ import annotations

import json
import os

import pytest

from tests import launch
from tests.integration.checkpoint_helpers import script

pytest.importorskip("olmo_eval")
pytestmark = pytest.mark.slow

TASKS = "arc_easy,winogrande,piqa_val_mc_5shot_fast"  # acc; contexts that differ per choice; fast multiple choice
LIMIT = 12
COMMON = ["--training.steps", "1", "--optimizer.lr", "0", "--lr_scheduler.warmup_steps", "0",
          "--training.seq_len", "128", "--training.local_batch_size", "4", "--metrics.log_freq", "1",
          "--downstream_eval.enable", "--downstream_eval.tasks", TASKS, "--downstream_eval.limit", str(LIMIT),
          "--comm.init_timeout_seconds", "120", "--comm.train_timeout_seconds", "120"]
OLMOE = ["--job.config_file", os.path.join(launch.ROOT, "train_configs", "olmoe_debug.toml")]
LLAMA = ["--job.config_file", launch.DEBUG_CONFIG]
SAVE = ["--checkpoint.enable", "--checkpoint.interval", "1"]

# name -> (world, args, reference)
LAYOUTS = {
    "single": (1, LLAMA + SAVE, "single"),
    "single_olmoe": (1, OLMOE, "single_olmoe"),
    "fsdp2": (2, LLAMA + ["--parallelism.data_parallel_shard_degree", "2", "--training.local_batch_size", "2",
                          "--downstream_eval.batch_tokens", "300"], "single"),
    "tp2": (2, LLAMA + ["--parallelism.tensor_parallel_degree", "2"], "single"),
    "pp2": (2, LLAMA + ["--parallelism.pipeline_parallel_degree", "2"], "single"),
    "cp2": (2, LLAMA + ["--parallelism.context_parallel_degree", "2"], "single"),
    "ep2": (2, OLMOE + ["--parallelism.expert_parallel_degree", "2", "--training.local_batch_size", "2"],
            "single_olmoe"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = str(tmp_path_factory.mktemp("downstream"))
    results, errors = {"_root": tmp}, []
    for world in (1, 2):
        spec = {"common": COMMON, "dump_root": os.path.join(tmp, f"runs{world}"),
                "layouts": {n: args for n, (w, args, _) in LAYOUTS.items() if w == world}}
        proc, out = launch.run_parity_driver(world, spec, os.path.join(tmp, f"spec{world}.json"),
                                             os.path.join(tmp, f"out{world}.json"))
        if proc.returncode != 0:
            errors.append(f"world {world}: {proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results.update(out)
    results["_errors"] = errors
    return results


def assert_same(got: dict, want: dict, rel: float) -> None:
    assert got.keys() == want.keys()
    for task, values in want.items():
        assert got[task].keys() == values.keys(), task
        for key, v in values.items():
            if key.startswith(("acc", "len_norm", "f1", "pmi_dc")):
                assert got[task][key] == v, (task, key, got[task][key], v)
            else:
                assert got[task][key] == pytest.approx(v, rel=rel), (task, key, got[task][key], v)


@pytest.mark.parametrize("name", [n for n in LAYOUTS if not n.startswith("single")])
def test_layout_reports_single_process_numbers(runs, name):
    assert name in runs, "\n".join(runs["_errors"])
    (got,), (want,) = runs[name]["downstream"], runs[LAYOUTS[name][2]]["downstream"]
    assert_same(got, want, rel=1e-5)


def test_in_loop_equals_evaluate_script_on_the_checkpoint(runs):
    assert "single" in runs, "\n".join(runs["_errors"])
    (in_loop,) = runs["single"]["downstream"]
    step = os.path.join(runs["_root"], "runs1", "single", "checkpoint", "step-1")
    p = script("evaluate.py", "--checkpoint", step, "--tasks", TASKS, "--limit", LIMIT, "--model-ctx-len", 128,
               "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same(json.loads(p.stdout.strip().splitlines()[-1])["results"], in_loop, rel=1e-5)
    # a random model at 12 documents still separates the tasks
    assert len({round(v["ce_loss_v1"], 4) for v in in_loop.values()}) == 3
    # two processes: the model FSDP-sharded, each loading its shards, the documents split between them
    p = launch.run_python(["-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend", "c10d",
                           "--rdzv_endpoint", "localhost:0", "scripts/evaluate.py", "--checkpoint", step, "--tasks",
                           TASKS, "--limit", str(LIMIT), "--model-ctx-len", "128", "--json"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same(json.loads(p.stdout.strip().splitlines()[-1])["results"], in_loop, rel=1e-5)
