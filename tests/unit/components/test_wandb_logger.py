"""Weights & Biases logging: offline runs written by MetricsLogger, read back from wandb's own run file."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import struct
import sys
import zlib

import pytest

from tests.launch import read_metrics, run_train_sh
from torchtitan.components.metrics import MetricsLogger
from torchtitan.components.wandb_logger import init_kwargs
from torchtitan.config import ConfigError, load_config
from torchtitan.config.job_config import Metrics

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

# wandb's own values in every history row (not scalars the trainer logged).
WANDB_KEYS = {"_step", "_runtime", "_timestamp"}


@pytest.fixture(scope="module", autouse=True)
def no_network(tmp_path_factory):
    """No credentials anywhere, so nothing can decide to go online, and wandb's files stay in tmp. Module-wide
    because wandb reads its environment once per process."""
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME",
                    "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_DIR", "WANDB_BASE_URL"):
            mp.delenv(var, raising=False)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_ERROR_REPORTING", "false")
        mp.setenv("NETRC", str(home / "netrc"))  # absent: no netrc entry
        mp.setenv("WANDB_CONFIG_DIR", str(home / "config"))
        mp.setenv("WANDB_CACHE_DIR", str(home / "cache"))
        yield home
        wandb.teardown()  # stop wandb's service process now, not at interpreter exit


def read_wandb_run(dump_folder: str) -> list:
    """The records of the one offline run under {dump_folder}/wandb, parsed from its .wandb file.

    wandb 0.31 writes that file from its Go core and ships no Python reader, so this follows the format the
    core writes (a LevelDB-style log): a 7-byte file header (":W&B", magic 0xBEE1, version 0), then 32 KiB
    blocks of chunks, each a 7-byte header (CRC-32 over type and data, length, type: full/first/middle/last)
    and its bytes; a block tail too short for a header is zero padding. Each record is a protobuf Record."""
    paths = glob.glob(os.path.join(dump_folder, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(paths) == 1, paths
    data = open(paths[0], "rb").read()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    block, header = 32768, 7
    pos, pending, records = 7, b"", []
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if (crc, length, kind) == (0, 0, 0):  # padding to the end of a block
            pos += left
            continue
        chunk = data[pos + header:pos + header + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"corrupt chunk at byte {pos}"
        assert kind in (1, 2, 3, 4), kind
        pending = chunk if kind in (1, 2) else pending + chunk
        pos += header + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    assert pos == len(data), "truncated run file"
    return records


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)


def history(records) -> dict[int, dict]:
    """step -> {name: value}: every row wandb stored."""
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {_key(i): json.loads(i.value_json) for i in r.history.item}
            assert r.history.step.num not in rows, "one row per step"
            rows[r.history.step.num] = {k: v for k, v in row.items() if k not in WANDB_KEYS}
    return rows


def run_record(records):
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert len(runs) == 1
    return runs[0]


def stored_config(records) -> dict:
    """The run config: what the run record carries plus any later config updates."""
    config = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        updates = r.run.config.update if kind == "run" else r.config.update if kind == "config" else ()
        config.update({_key(i): json.loads(i.value_json) for i in updates})
    config.pop("_wandb", None)  # wandb's own bookkeeping
    return config


def expected_scalars(records: list[dict]) -> dict[int, dict]:
    """What TensorBoard gets from the trainer's records (metrics.jsonl lines): step -> {name: value}."""
    out: dict[int, dict] = {}
    for rec in records:
        row = out.setdefault(rec["step"], {})
        if "validation_loss" in rec:
            row.update({"validation/loss": rec["validation_loss"], "validation/ppl": rec["validation_ppl"]})
        else:
            # A mixture's data/<source>/* keep their names (TensorBoard's too).
            row.update({(k if k.startswith("data/") else f"train/{k}"): v for k, v in rec.items()
                        if k != "step" and v is not None})
    return out


def test_every_scalar_and_the_config_are_in_the_offline_run(tmp_path):
    dump = str(tmp_path / "my_run")
    cfg = Metrics(log_freq=1, enable_wandb=True, wandb_mode="offline", wandb_project="proj", wandb_tags=["a", "b"])
    run_config = dataclasses.asdict(load_config(["--training.steps", "6"], env={}))
    m = MetricsLogger(cfg, dump, rank=0, device_type="cpu", flops_per_token=6e6, world_size=1, total_steps=6,
                      write_files=True, run_config=run_config)
    recs = []
    for step in range(1, 7):
        m.add_step(4096)
        recs.append(m.log(step, loss=10.0 / step, grad_norm=0.5 + step, lr=1e-3 * step,
                          extra={"skipped_steps": step // 3, "moe/load_imbalance": 0.25 * step,
                                 "data/web/share": 0.6, "data/web/tokens": 100 * step}))
        if step in (3, 6):
            recs.append(m.log_validation(step, loss=4.0 - step / 10, perplexity=50.0 - step, tokens=1024,
                                         seconds=0.1))
    m.close()
    assert m.wandb is None

    records = read_wandb_run(dump)
    rows, expected = history(records), expected_scalars(recs)
    assert rows == expected  # every scalar at its step, nothing else, and the same names as TensorBoard's
    n = sum(len(r) for r in rows.values())
    assert n == 6 * 13 + 2 * 2 and rows[6]["validation/ppl"] == 44.0 and rows[2]["train/moe/load_imbalance"] == 0.5
    assert rows[2]["data/web/tokens"] == 200 and rows[2]["data/web/share"] == 0.6
    assert "train/mfu" not in rows[1]  # None on CPU: not a scalar
    run = run_record(records)
    assert (run.project, run.display_name, list(run.tags)) == ("proj", "my_run", ["a", "b"])
    assert stored_config(records) == json.loads(json.dumps(run_config))
    assert stored_config(records)["training"]["steps"] == 6


def test_only_the_ranks_that_write_files_open_a_run(tmp_path):
    cfg = Metrics(enable_wandb=True, wandb_mode="offline")
    m = MetricsLogger(cfg, str(tmp_path / "r1"), rank=1, device_type="cpu", flops_per_token=1.0, world_size=2,
                      total_steps=2, write_files=False)
    m.add_step(10)
    m.log(1, 1.0, 1.0, 1e-3)
    m.close()
    assert m.wandb is None and not os.path.exists(tmp_path / "r1")


def test_config_beats_env_beats_fallbacks(tmp_path):
    def online():
        raise AssertionError("not asked: the mode is decided before credentials matter")

    env = {"WANDB_PROJECT": "envp", "WANDB_ENTITY": "enve", "WANDB_NAME": "envn", "WANDB_RUN_GROUP": "envg",
           "WANDB_TAGS": "x, y,", "WANDB_MODE": "disabled"}
    kw = init_kwargs(Metrics(wandb_mode="offline"), str(tmp_path / "job"), env, online)
    assert kw == {"project": "envp", "entity": "enve", "name": "envn", "group": "envg", "tags": ["x", "y"],
                  "mode": "offline", "dir": str(tmp_path / "job")}
    cfg = Metrics(wandb_project="p", wandb_entity="e", wandb_run_name="n", wandb_group="g", wandb_tags=["t"])
    kw = init_kwargs(cfg, str(tmp_path / "job"), env, online)
    assert [kw[k] for k in ("project", "entity", "name", "group", "tags", "mode")] == ["p", "e", "n", "g", ["t"],
                                                                                        "disabled"]
    kw = init_kwargs(Metrics(), str(tmp_path / "job"), {}, lambda: False)
    assert [kw[k] for k in ("project", "entity", "name", "group", "tags", "mode")] == ["torchtitan", None, "job",
                                                                                        None, None, "offline"]
    assert init_kwargs(Metrics(), str(tmp_path / "job"), {}, lambda: True)["mode"] == "online"


def test_fault_tolerance_replica_folders_name_their_runs(tmp_path):
    kw = init_kwargs(Metrics(wandb_mode="offline"), str(tmp_path / "ftjob" / "replica_3"), {}, lambda: False)
    assert (kw["name"], kw["group"], kw["dir"]) == ("ftjob-replica3", "ftjob", str(tmp_path / "ftjob" / "replica_3"))
    kw = init_kwargs(Metrics(wandb_mode="offline", wandb_run_name="exp", wandb_group="sweep"),
                     str(tmp_path / "ftjob" / "replica_0"), {}, lambda: False)
    assert (kw["name"], kw["group"]) == ("exp-replica0", "sweep")


def test_bad_wandb_mode_env_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^WANDB_MODE='nope' is not a wandb mode \(one of online, offline"):
        init_kwargs(Metrics(), str(tmp_path), {"WANDB_MODE": "nope"}, lambda: False)


def test_online_without_credentials_is_one_line(tmp_path):
    cfg = Metrics(enable_wandb=True, wandb_mode="online")
    with pytest.raises(ConfigError, match="^metrics.wandb_mode online needs W&B credentials: set WANDB_API_KEY"):
        MetricsLogger(cfg, str(tmp_path), 0, "cpu", 1.0, 1, 2, write_files=True)
    assert not os.path.exists(tmp_path / "wandb")


def test_missing_wandb_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees where it is not installed
    with pytest.raises(ConfigError, match=r"^metrics.enable_wandb needs the wandb package: pip install wandb$"):
        MetricsLogger(Metrics(enable_wandb=True), str(tmp_path), 0, "cpu", 1.0, 1, 2, write_files=True)


@pytest.mark.slow
def test_training_run_logs_every_metrics_jsonl_scalar_to_wandb(tmp_path, no_network):
    """The real entry point: every scalar of metrics.jsonl (training and validation) is in the W&B run file,
    and so is the resolved config."""
    dump = str(tmp_path / "e2e")
    env = {"WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false", "NETRC": str(no_network / "netrc"),
           "WANDB_CONFIG_DIR": str(no_network / "config"), "WANDB_CACHE_DIR": str(no_network / "cache")}
    proc = run_train_sh(1, dump, ["--training.steps", "4", "--metrics.log_freq", "1", "--training.seq_len", "64",
                                  "--training.local_batch_size", "2", "--metrics.enable_wandb",
                                  "--metrics.wandb_mode", "offline", "--metrics.wandb_tags", "e2e",
                                  "--validation.enable", "--validation.freq", "2", "--validation.steps", "1",
                                  "--validation.seq_len", "64", "--validation.local_batch_size", "2"],
                        extra_env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = read_metrics(dump)
    assert sorted({r["step"] for r in recs if "validation_loss" in r}) == [2, 4]
    records = read_wandb_run(dump)
    rows, expected = history(records), expected_scalars(recs)
    assert rows == expected
    assert sum(len(r) for r in rows.values()) >= 4 * 9 + 2 * 2
    run = run_record(records)
    assert (run.display_name, list(run.tags)) == ("e2e", ["e2e"])
    config = stored_config(records)
    assert config["training"]["steps"] == 4 and config["metrics"]["enable_wandb"] is True
    assert config["job"]["dump_folder"] == dump
    assert "W&B: offline run e2e" in proc.stdout + proc.stderr


def test_online_without_credentials_stops_every_rank_before_training(tmp_path, no_network):
    """Checked in preflight on every rank (trainer/checks.py), not by rank 0 alone while the others wait in a
    collective: through run_train.sh it is one line and exit 2 before torchrun starts."""
    env = {"WANDB_MODE": "online", "NETRC": str(no_network / "netrc"), "WANDB_CONFIG_DIR": str(no_network / "config")}
    proc = run_train_sh(2, str(tmp_path / "run"), ["--metrics.enable_wandb", "--metrics.wandb_mode", "online"],
                        extra_env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "error: metrics.wandb_mode online needs W&B credentials: set WANDB_API_KEY or run `wandb login` (or use "
        "metrics.wandb_mode = \"offline\" and `wandb sync` later)"]
