"""torchtitan 0.2.2's own Llama 3 configs through run_train.sh, unchanged: the debug one trains, 8B dry-runs."""
from __future__ import annotations

import os

import pytest

from tests.launch import ROOT, read_metrics, run_train_sh
from tests.torchtitan_configs import DEBUG_MODEL, LLAMA3_8B, LLAMA3_70B, LLAMA3_405B, write_toml

TOKENIZER = os.path.join(ROOT, "torchtitan", "assets", "tokenizer")


@pytest.mark.slow
def test_torchtitan_debug_config_trains(tmp_path):
    """Only the tokenizer folder (model.hf_assets_path, torchtitan's layout) and the step count are given on the
    command line; c4_test reads the bundled corpus."""
    config = write_toml(DEBUG_MODEL, tmp_path / "debug_model.toml")
    dump = str(tmp_path / "run")
    proc = run_train_sh(1, dump, ["--model.hf_assets_path", TOKENIZER, "--training.steps", "2"],
                        extra_env={"CONFIG": config}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert [r["step"] for r in read_metrics(dump)] == [1, 2]
    assert 'training.dataset = "c4_test"' in out and "validation.freq (from" in out  # what it reads, logged


@pytest.mark.slow
@pytest.mark.parametrize("name,table,ngpu,params", [
    ("llama3_8b", LLAMA3_8B, 8, "8,030,261,248"), ("llama3_70b", LLAMA3_70B, 64, "70,553,706,496"),
    ("llama3_405b", LLAMA3_405B, 128, "405,853,388,800")])
def test_torchtitan_llama3_configs_dry_run(tmp_path, name, table, ngpu, params):
    """At the world sizes they are written for (405B: float8 and async TP are GPU-only, logged as not applied)."""
    config = write_toml(table, tmp_path / f"{name}.toml")
    proc = run_train_sh(ngpu, str(tmp_path / "run"), [], extra_env={"CONFIG": config, "COMM_MODE": "fake_backend"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{params} parameters, world {ngpu}" in proc.stdout
