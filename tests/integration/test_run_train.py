"""run_train.sh end to end, as users launch it, with 1 and 2 CPU processes."""
import os
import platform

import pytest

from tests.launch import read_metrics, run_train_sh

KEYS = {"step", "loss", "grad_norm", "lr", "tps", "tflops", "mfu", "memory_gib"}


@pytest.mark.slow
@pytest.mark.parametrize("ngpu", [1, 2])
def test_run_train_sh(tmp_path, ngpu):
    dump = str(tmp_path / "run")
    proc = run_train_sh(ngpu, dump, ["--training.steps", "4", "--metrics.log_freq", "2", "--training.seq_len", "64",
                                     "--training.local_batch_size", str(4 // ngpu), "--metrics.enable_tensorboard"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = read_metrics(dump)
    assert [r["step"] for r in recs] == [1, 2, 4]
    for r in recs:
        assert KEYS <= set(r)
        assert r["mfu"] is None  # CPU: no peak-FLOPS basis
    assert " step      4  loss" in proc.stdout + proc.stderr
    if platform.libc_ver()[0] == "glibc":  # CPU runs keep freed host memory by default
        assert "host memory: freed blocks stay in the heap" in proc.stdout + proc.stderr
    assert os.listdir(os.path.join(dump, "tb"))
    return recs


@pytest.mark.slow
def test_one_and_two_processes_same_losses(tmp_path):
    """From one seed checkpoint (made with the documented command), FSDP over 2 CPU processes trains
    what 1 process trains: the same global batches, the same losses."""
    seed_dump = str(tmp_path / "seed")
    proc = run_train_sh(1, seed_dump, ["--checkpoint.enable_checkpoint", "--checkpoint.create_seed_checkpoint",
                                       "--training.data_parallel_replicate_degree", "1",
                                       "--training.data_parallel_shard_degree", "1",
                                       "--training.tensor_parallel_degree", "1",
                                       "--experimental.pipeline_parallel_degree", "1",
                                       "--experimental.context_parallel_degree", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    seed = os.path.join(seed_dump, "checkpoint", "step-0")
    assert os.path.isfile(os.path.join(seed, ".metadata"))
    out = {}
    for ngpu in (1, 2):
        dump = str(tmp_path / f"n{ngpu}")
        proc = run_train_sh(ngpu, dump, ["--training.steps", "3", "--metrics.log_freq", "1",
                                         "--training.seq_len", "64", "--training.local_batch_size", str(4 // ngpu),
                                         "--checkpoint.enable_checkpoint", "--checkpoint.initial_load_path", seed,
                                         "--checkpoint.interval", "100"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[ngpu] = [r["loss"] for r in read_metrics(dump)]
    assert out[1] == pytest.approx(out[2], abs=1e-5)


@pytest.mark.slow
def test_nan_loss_stops_with_step(tmp_path):
    proc = run_train_sh(1, str(tmp_path / "nan"), ["--training.steps", "6", "--training.seq_len", "32",
                                                   "--optimizer.lr", "1e30", "--training.max_norm", "0",
                                                   "--lr_scheduler.warmup_steps", "0", "--metrics.log_freq", "3"])
    assert proc.returncode != 0
    assert "nan/inf at step" in proc.stdout + proc.stderr


def test_bad_degree_fails_before_launch(tmp_path):
    proc = run_train_sh(2, str(tmp_path / "bad"), ["--parallelism.tensor_parallel_degree", "4"], timeout=120)
    assert proc.returncode != 0
    assert "world size 2 is not divisible" in proc.stdout + proc.stderr


@pytest.mark.parametrize("ngpu,args,fragment", [
    (1, ["--training.stepz", "3"], "unknown config key 'training.stepz'"),
    (2, ["--parallelism.tensor_parallel_degree", "3"], "world size 2 is not divisible"),
    (2, ["--checkpoint.enable_checkpoint", "--checkpoint.create_seed_checkpoint"],
     "create_seed_checkpoint needs a single process"),
    (1, ["--model.flavor", "9T"], "model.flavor '9T' is not a llama3 flavor"),
    (1, ["--checkpoint.enable", "--checkpoint.initial_load_path", "/nonexistent/step-3"],
     "checkpoint.initial_load_path /nonexistent/step-3: no such file or folder"),
    (1, ["--training.document_rope_restart"], "needs data.document_masking = true"),
    (2, ["--training.dataset", "memmap", "--training.memmap_paths", __file__, "--training.document_masking"],
     "data.document_masking on memmap data needs model.tokenizer_path"),
])
def test_config_errors_are_one_line_before_torchrun(tmp_path, ngpu, args, fragment):
    """The launcher validates in one process: no worker, no process group, no torchrun traceback."""
    proc = run_train_sh(ngpu, str(tmp_path / "bad"), args, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert lines == [f"error: {lines[0][7:]}"] and fragment in lines[0], lines
    assert not os.path.exists(tmp_path / "bad")


@pytest.mark.slow
def test_runtime_user_error_is_one_line(tmp_path):
    """An error only a worker can find (this folder is no checkpoint) is still one line, and exit code 3."""
    (tmp_path / "empty").mkdir()
    proc = run_train_sh(2, str(tmp_path / "run"), ["--checkpoint.enable", "--checkpoint.initial_load_path",
                                                    str(tmp_path / "empty"), "--training.seq_len", "64"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "is not a DCP checkpoint (no .metadata file)" in errors[0], errors


@pytest.mark.slow
def test_short_sequences_validate_without_setting_validation_seq_len(tmp_path):
    """validation.seq_len defaults to training.seq_len: a 256-token run with validation on used to train two steps
    and then die in the first validation (the model's RoPE table is built for 256, validation asked for 2048)."""
    dump = str(tmp_path / "run")
    proc = run_train_sh(1, dump, ["--training.steps", "2", "--training.seq_len", "256", "--validation.enable",
                                  "--validation.freq", "1", "--validation.steps", "1", "--metrics.log_freq", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    validations = [r for r in read_metrics(dump) if "validation_loss" in r]
    assert [r["step"] for r in validations] == [1, 2]
    assert all(r["validation_tokens"] == 8 * 256 for r in validations)  # one batch of training's 8 x 256 windows


def test_global_batch_with_replica_groups_is_a_preflight_error(tmp_path):
    """The global batch counts every replica group: 24 sequences, local 4, dp 1 and 4 groups is no whole number
    of micro-batches. It used to train 16-sequence steps silently; now it is one line, exit 2, before torchrun."""
    proc = run_train_sh(1, str(tmp_path / "ft"), ["--fault_tolerance.enable", "--fault_tolerance.group_size", "4",
                                                  "--fault_tolerance.lighthouse", "http://127.0.0.1:1",
                                                  "--training.local_batch_size", "4",
                                                  "--training.global_batch_size", "24"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: training.global_batch_size = 24 must be a multiple of training.local_batch_size 4 x "
                     "data-parallel degree 1 x fault_tolerance.group_size 4 = 16"], proc.stderr
    assert not os.path.exists(tmp_path / "ft")
