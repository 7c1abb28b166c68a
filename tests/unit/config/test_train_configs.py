"""Each shipped train_config that extends a base resolves to what one flat file with the merged tables does."""
from __future__ import annotations

import glob
import os
import sys

import pytest

from torchtitan.config import load_config, to_toml
from torchtitan.config.manager import toml_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _read(path: str) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def _merge(into: dict, new: dict) -> dict:
    for k, v in new.items():
        into[k] = _merge(into.get(k, {}), v) if isinstance(v, dict) else v
    return into


def _flat(path: str) -> dict:
    data = _read(path)
    base = data.pop("extends", None)
    return _merge(_flat(os.path.join(os.path.dirname(path), base)) if base else {}, data)


def _dotted(table: dict, prefix: str = ""):
    for k, v in table.items():
        yield from _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]


EXTENDING = sorted(p for p in glob.glob(os.path.join(ROOT, "train_configs", "*.toml")) if "extends" in _read(p))


def test_configs_use_extends():
    assert EXTENDING


@pytest.mark.parametrize("path", EXTENDING, ids=os.path.basename)
def test_extending_config_equals_its_flattened_copy(path, tmp_path):
    flat = tmp_path / "flat.toml"
    flat.write_text("".join(f"[{section}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in _dotted(table))
                            for section, table in _flat(path).items()))
    configs = [load_config(["--job.config_file", p], env={}) for p in (path, str(flat))]
    assert set(configs[0].set_by) == set(configs[1].set_by)
    for cfg in configs:
        cfg.job.config_file = ""
    assert to_toml(configs[0]) == to_toml(configs[1])
