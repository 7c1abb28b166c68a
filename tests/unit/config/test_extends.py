"""Config inheritance: `extends = "base.toml"` chains, merged key by key; every value knows where it came from."""
from __future__ import annotations

import pytest

from torchtitan.config import ConfigError, load_config, to_toml


def _write(folder, name, text):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_two_level_chain_equals_the_flattened_file(tmp_path):
    _write(tmp_path, "bases/base.toml", '[training]\nsteps = 100\nseq_len = 512\n[optimizer]\nlr = 1e-3\n'
                                        '[model]\nconverters = ["float8", "float8"]\n')
    _write(tmp_path, "bases/mid.toml",
           'extends = "base.toml"\n[training]\nseq_len = 256\n[model]\nconverters = ["float8"]\n')
    leaf = _write(tmp_path, "leaf.toml", 'extends = "bases/mid.toml"\n[optimizer]\nlr = 3e-4\n[job]\n'
                                         'description = "leaf"\n')
    flat = _write(tmp_path, "flat.toml", '[training]\nsteps = 100\nseq_len = 256\n[optimizer]\nlr = 3e-4\n'
                                         '[model]\nconverters = ["float8"]\n[job]\ndescription = "leaf"\n')
    chained, flattened = load_config(["--job.config_file", leaf], env={}), load_config(["--job.config_file", flat],
                                                                                        env={})
    chained.job.config_file = flattened.job.config_file
    assert to_toml(chained) == to_toml(flattened)
    assert chained.model.converters == ["float8"]  # a list is replaced whole, not merged
    assert chained.set_by["training.steps"].endswith("base.toml")
    assert chained.set_by["training.seq_len"].endswith("mid.toml")
    assert chained.set_by["optimizer.lr"].endswith("leaf.toml")


def test_print_config_names_the_origin_of_every_value(tmp_path):
    _write(tmp_path, "base.toml", "[training]\nsteps = 100\nseq_len = 512\n")
    leaf = _write(tmp_path, "leaf.toml", 'extends = "base.toml"\n[training]\nseq_len = 256\n')
    cfg = load_config(["--job.config_file", leaf, "--training.steps", "7"], env={})
    lines, section = {}, ""
    for line in to_toml(cfg, origins=True).splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line:
            lines[f"{section}.{line.split('=')[0].strip()}"] = line
    assert lines["training.steps"].endswith("# command line") and "= 7" in lines["training.steps"]
    assert lines["training.seq_len"].endswith(f"# {leaf}")
    assert lines["training.local_batch_size"].endswith("# default")
    assert lines["job.config_file"].endswith("# command line")
    from_env = load_config([], env={"CONFIG": leaf})
    assert to_toml(from_env, origins=True).splitlines()[1].endswith("# CONFIG environment variable")
    # Every key line carries an origin, and the text stays TOML that loads back to the same config.
    body = [line for line in to_toml(cfg, origins=True).splitlines() if line and not line.startswith(("[", "# "))]
    assert all("  # " in line for line in body)
    again = _write(tmp_path, "again.toml", to_toml(cfg, origins=True))
    assert to_toml(load_config(["--job.config_file", again], env={})).split("\n", 2)[2] == to_toml(cfg).split(
        "\n", 2)[2]


def test_cycle_and_missing_base_are_one_line_errors(tmp_path):
    a = _write(tmp_path, "a.toml", 'extends = "b.toml"\n')
    _write(tmp_path, "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(ConfigError, match=r"^config files extend each other in a cycle: .*a.toml -> .*b.toml -> "
                                          r".*a.toml$"):
        load_config(["--job.config_file", a], env={})
    lost = _write(tmp_path, "lost.toml", 'extends = "nowhere.toml"\n')
    with pytest.raises(ConfigError, match=r"lost.toml: extends = 'nowhere.toml': no such file"):
        load_config(["--job.config_file", lost], env={})
    bad = _write(tmp_path, "bad.toml", "extends = 3\n")
    with pytest.raises(ConfigError, match="extends must be a file name"):
        load_config(["--job.config_file", bad], env={})


def test_an_error_in_a_base_names_the_base(tmp_path):
    base = _write(tmp_path, "base.toml", "[training]\nstepz = 1\n")
    leaf = _write(tmp_path, "leaf.toml", 'extends = "base.toml"\n')
    with pytest.raises(ConfigError, match=rf"^{base}: unknown config key 'training.stepz'"):
        load_config(["--job.config_file", leaf], env={})
