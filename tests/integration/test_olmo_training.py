"""OLMo end to end with torchrun on CPU: TP/FSDP parity with one process, and memmap data
prepared -> trained on 2 ranks -> resumed on 1 rank -> inspected."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from tests.launch import ROOT, TINY, losses, make_seed_checkpoint, run_python, run_train

pytestmark = pytest.mark.slow

OLMO2_DEBUG = os.path.join(ROOT, "train_configs", "olmo2_debug.toml")


def assert_same_losses(a: dict, b: dict, tol: float = 2e-4) -> None:
    assert sorted(a) == sorted(b), (a, b)
    for step in a:
        assert abs(a[step] - b[step]) <= tol * max(1.0, abs(a[step])), (step, a, b)


@pytest.fixture(scope="module")
def olmo2_seed(tmp_path_factory) -> str:
    """Step-0 weights every layout starts from (sharded random init differs from single-process init)."""
    return make_seed_checkpoint(str(tmp_path_factory.mktemp("olmo2_seed")), ["--job.config_file", OLMO2_DEBUG])


def test_olmo2_tensor_parallel_matches_single_process(tmp_path, olmo2_seed):
    """QK-norm over heads split across ranks (statistics all-reduced) trains exactly like one process."""
    common = ["--job.config_file", OLMO2_DEBUG, *TINY, "--training.z_loss_multiplier", "1e-4", "--checkpoint.enable",
              "--checkpoint.initial_load_path", olmo2_seed]
    run_train(str(tmp_path / "single"), common, config=OLMO2_DEBUG)
    run_train(str(tmp_path / "tp2"), [*common, "--parallelism.tensor_parallel_degree", "2"], nproc=2,
              config=OLMO2_DEBUG)
    assert_same_losses(losses(str(tmp_path / "single")), losses(str(tmp_path / "tp2")))


def test_olmo2_no_embedding_decay_fsdp_matches_single_process(tmp_path, olmo2_seed):
    """decay_embeddings = false (OLMo 2's recipe) on FSDP2 DTensor shards over 2 ranks: the same losses as one
    process after 3 steps, with the embedding in its own group of weight decay 0 on both."""
    common = ["--job.config_file", OLMO2_DEBUG, *TINY, "--training.steps", "3", "--optimizer.decay_embeddings=false",
              "--training.global_batch_size", "8", "--checkpoint.enable", "--checkpoint.initial_load_path", olmo2_seed]
    procs = [run_train(str(tmp_path / "single"), common, config=OLMO2_DEBUG),  # 2 micro-batches of 4
             run_train(str(tmp_path / "fsdp2"), [*common, "--parallelism.data_parallel_shard_degree", "2"], nproc=2,
                       config=OLMO2_DEBUG)]  # 2 ranks x 4
    for proc in procs:
        assert "none on 1 tensors (524,288 parameters: embedding)" in proc.stdout + proc.stderr
    single = losses(str(tmp_path / "single"))
    assert sorted(single) == [1, 2, 3]
    assert_same_losses(single, losses(str(tmp_path / "fsdp2")))


def test_olmo_tied_fsdp_and_tp_match_single_process(tmp_path):
    """OLMo 1 debug ties embedding and output (like the 1B): one FSDP group and one TP DTensor for both."""
    model = ["--model.name", "olmo", "--model.flavor", "debugmodel"]
    seed = make_seed_checkpoint(str(tmp_path / "seed"), model)
    common = [*TINY, *model, "--training.global_batch_size", "8", "--checkpoint.enable",
              "--checkpoint.initial_load_path", seed]
    run_train(str(tmp_path / "single"), common)  # 2 micro-batches of 4
    run_train(str(tmp_path / "fsdp2"), common, nproc=2)  # 2 ranks x 4
    run_train(str(tmp_path / "tp2"), [*common, "--parallelism.tensor_parallel_degree", "2"], nproc=2)
    single = losses(str(tmp_path / "single"))
    assert_same_losses(single, losses(str(tmp_path / "fsdp2")))
    assert_same_losses(single, losses(str(tmp_path / "tp2")))


def test_memmap_prepare_train_resume_on_fewer_ranks_and_inspect(tmp_path, olmo2_seed):
    data = tmp_path / "data"
    proc = run_python(["scripts/prepare_memmap_data.py", "--source", "pydoc", "--out-dir", str(data),
                       "--tokens-per-file", "50000"])
    assert proc.returncode == 0, proc.stderr
    paths = sorted(str(data / p) for p in os.listdir(data) if p.endswith(".npy"))
    assert len(paths) >= 2
    # Global batch of 8 sequences: 1 rank accumulates 2 micro-batches of 4, 2 ranks take 4 each.
    common = [*TINY, "--training.dataset", "memmap", "--training.memmap_paths", ",".join(paths),
              "--training.global_batch_size", "8", "--training.seed", "11", "--training.steps", "4"]
    start = ["--checkpoint.initial_load_path", olmo2_seed]
    run_train(str(tmp_path / "reference"), [*common, *start, "--checkpoint.enable"], config=OLMO2_DEBUG)
    # 2 ranks train the same 4 steps, saving a full checkpoint at step 2...
    run = str(tmp_path / "run")
    run_train(run, [*common, *start, "--checkpoint.enable", "--checkpoint.interval", "2"], nproc=2, config=OLMO2_DEBUG)
    reference = losses(str(tmp_path / "reference"))
    assert_same_losses(losses(run), reference)
    # ...from which 1 rank resumes steps 3-4 (a copy: the run's final export already holds step 4).
    resume = str(tmp_path / "resume")
    shutil.copytree(run, resume, ignore=shutil.ignore_patterns("step-4", "metrics.jsonl"))
    run_train(resume, [*common, "--checkpoint.enable", "--checkpoint.interval", "2"], config=OLMO2_DEBUG)
    resumed = losses(resume)
    assert sorted(resumed) == [3, 4]
    assert_same_losses(resumed, {s: reference[s] for s in (3, 4)})

    order = np.fromfile(os.path.join(run, "global_indices.npy"), dtype=np.uint32)
    proc = run_python(["scripts/inspect_batch.py", "--batch", "3", "--json", "--max-tokens", "0",
                       "--job.config_file", OLMO2_DEBUG, "--job.dump_folder", run, *common])
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["instance"] for r in rows] == order[24:32].tolist()
    assert all(len(r["ids"]) == 64 for r in rows)
