"""torchtitan 0.2.x configs as users bring them: every key of torchtitan 0.2.2's job config is ours, an alias,
or a one-line error; its own Llama 3 configs plan unchanged."""
from __future__ import annotations

import pytest
import tomllib

from tests.torchtitan_configs import (
    DEBUG_MODEL,
    JOB_CONFIG_KEYS,
    LLAMA3_8B,
    LLAMA3_70B,
    LLAMA3_405B,
    OTHER_FAMILIES,
    write_toml,
)
from torchtitan.config import ConfigError, load_config
from torchtitan.config.manager import _canonical_key
from torchtitan.config.torchtitan_keys import TORCHTITAN_KEYS, Alias, NoEffect, Unsupported
from torchtitan.trainer.checks import check_config
from torchtitan.trainer.plan import make_plan


@pytest.mark.parametrize("key", JOB_CONFIG_KEYS)
def test_every_torchtitan_key_is_known(key):
    """A key of torchtitan 0.2.2 is in the torchtitan table or has the same name here; nothing falls through."""
    if key not in TORCHTITAN_KEYS:
        _canonical_key(key)  # ours, under the same name


def test_table_targets_are_our_keys():
    for key, entry in TORCHTITAN_KEYS.items():
        if isinstance(entry, Alias):
            assert _canonical_key(entry.key), key


@pytest.mark.parametrize("key", [k for k, e in TORCHTITAN_KEYS.items() if isinstance(e, Unsupported)])
def test_unsupported_keys_pass_at_their_default_and_fail_otherwise(tmp_path, key):
    entry = TORCHTITAN_KEYS[key]
    section, _, rest = key.partition(".")
    if entry.default is not None:  # TOML has no null: a key whose default is None is an error whenever set
        path = write_toml({section: _nested(rest, entry.default)}, tmp_path / "ok.toml")
        assert key not in load_config(["--job.config_file", path], env={}).set_by
    other = {bool: lambda d: not d, int: lambda d: d + 7, str: lambda d: d + "x", list: lambda d: [*d, "x"]}
    bad = other[type(entry.default)](entry.default) if entry.default is not None else 3
    path = write_toml({section: _nested(rest, bad)}, tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match=rf"{key} = .* \(a torchtitan option\) is not supported here: "):
        load_config(["--job.config_file", path], env={})


def _nested(dotted: str, value) -> dict:
    head, _, rest = dotted.partition(".")
    return {head: _nested(rest, value) if rest else value}


def test_no_effect_keys_are_logged(tmp_path):
    path = write_toml({"metrics": {"disable_color_printing": True}, "job": {"use_for_integration_test": True}},
                      tmp_path / "c.toml")
    notes = load_config(["--job.config_file", path], env={}).notes
    assert any(n.startswith("metrics.disable_color_printing (torchtitan) has no effect here") for n in notes)
    assert len(notes) == 2 and all(isinstance(TORCHTITAN_KEYS[n.split()[0]], NoEffect) for n in notes)


def test_values_torchtitan_spells_differently(tmp_path):
    path = write_toml({"model": {"converters": ["quantize.linear.float8"], "hf_assets_path": "/tok"},
                       "training": {"dataset": "c4_test"}, "debug": {"seed": 11, "deterministic": True},
                       "memory_estimation": {"enable": True},
                       "quantize": {"linear": {"float8": {"recipe_name": "rowwise", "filter_fqns": ["output", "x"]}}},
                       "fault_tolerance": {"process_group_timeout_ms": 10500}}, tmp_path / "c.toml")
    cfg = load_config(["--job.config_file", path], env={})
    assert cfg.model.converters == ["float8"] and cfg.model.tokenizer_path == "/tok"
    assert cfg.data.dataset == "pydoc" and (cfg.training.seed, cfg.training.deterministic) == (11, True)
    assert cfg.memory_estimation.enabled and cfg.float8.recipe_name == "rowwise"
    assert cfg.float8.filter_fqns == ["output", "x"] and cfg.fault_tolerance.timeout_seconds == 11
    path = write_toml({"fault_tolerance": {"semi_sync_method": "local_sgd"}}, tmp_path / "l.toml")
    with pytest.raises(ConfigError, match="outer_momentum = 0 is local SGD"):
        load_config(["--job.config_file", path], env={})


def test_older_names_in_torchtitan_configs(tmp_path):
    """Configs of torchtitan 0.1 and early 0.2 carry keys 0.2.2 renamed: they are accepted too."""
    path = write_toml({"job": {"print_args": True, "use_for_integration_test": True},
                       "validation": {"enabled": True}}, tmp_path / "c.toml")
    cfg = load_config(["--job.config_file", path], env={})
    assert cfg.job.print_args and cfg.validation.enable


@pytest.mark.parametrize("table,world", [(DEBUG_MODEL, 1), (LLAMA3_8B, 8), (LLAMA3_70B, 64), (LLAMA3_405B, 128)],
                         ids=["debug_model", "llama3_8b", "llama3_70b", "llama3_405b"])
def test_torchtitan_llama3_configs_plan_unchanged(tmp_path, table, world):
    """The files as torchtitan 0.2.2 ships them, checked and planned at their world sizes (as the dry run plans
    them: GPU-only features and tokenizer files are not needed to plan)."""
    path = write_toml(table, tmp_path / "c.toml")
    assert tomllib.load(open(path, "rb")) == table  # the file holds exactly the key set
    cfg = load_config(["--job.config_file", path, "--comm.mode", "fake_backend"], env={})
    plan = make_plan(cfg, world, device_type="cpu")
    t = table["training"]
    assert (cfg.model.flavor, cfg.training.seq_len, plan.batch.local_batch_size) == (
        table["model"]["flavor"], t["seq_len"], t["local_batch_size"])
    assert plan.dims.tp == table["parallelism"]["tensor_parallel_degree"]


@pytest.mark.parametrize("name", sorted(OTHER_FAMILIES))
def test_torchtitan_qwen3_and_deepseek_configs_load(tmp_path, name):
    """Every key of torchtitan 0.2.2's Qwen3 and DeepSeek-V3 configs is accepted, and the files plan at 8 ranks
    as they are, except two flavors we do not have, each named in one line: torchtitan's one qwen3 name also
    covers its MoE flavors (ours are qwen3_moe's), and its DeepSeek-V3 "16B" is deepseek-moe-16b's shape (our
    16B-A3B is Moonlight's)."""
    table = OTHER_FAMILIES[name]
    path = write_toml(table, tmp_path / "c.toml")
    cfg = load_config(["--job.config_file", path, "--comm.mode", "fake_backend"], env={})
    check_config(cfg)
    missing = {"qwen3_moe_debug": ("debugmodel_moe", "qwen3"), "deepseek_v3_16b": ("16B", "deepseek_v3")}
    if name in missing:
        flavor, family = missing[name]
        with pytest.raises(ConfigError, match=rf"^model.flavor '{flavor}' is not a {family} flavor; valid: "):
            make_plan(cfg, 8, device_type="cpu")
    else:
        plan = make_plan(cfg, 8, device_type="cpu")
        assert plan.spec.name == table["model"]["name"] and cfg.model.flavor == table["model"]["flavor"]
