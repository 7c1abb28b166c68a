"""[[data.sources]] tables, and OLMo's key names (its fine-tuning command) as aliases of ours."""
from __future__ import annotations

import sys

import pytest

from torchtitan.config import load_config, to_toml
from torchtitan.config.job_config import Source
from torchtitan.tools.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MIX = """
[training]
steps = 10
[[data.sources]]
name = "web"
paths = ["web/*.npy"]
target_ratio = 0.7
[[data.sources]]
name = "code"
paths = ["code/a.npy", "code/b.npy"]
label_mask_paths = ["code/a.mask", "code/b.mask"]
target_ratio = 0.3
max_repetition = 2
"""


def _load(tmp_path, text: str, argv=(), name: str = "job.toml"):
    path = tmp_path / name
    path.write_text(text)
    return load_config(["--job.config_file", str(path), *argv], env={})


def test_source_tables_are_typed_dataclasses_and_mean_memmap(tmp_path):
    cfg = _load(tmp_path, MIX)
    assert cfg.data.dataset == "memmap"  # token files given, no dataset named
    assert cfg.data.sources == [Source("web", ["web/*.npy"], [], 0.7, 1.0),
                                Source("code", ["code/a.npy", "code/b.npy"], ["code/a.mask", "code/b.mask"], 0.3, 2.0)]
    # The printed config is TOML again, with the same sources (inline tables).
    printed = tomllib.loads(to_toml(cfg))
    assert [Source(**s) for s in printed["data"]["sources"]] == cfg.data.sources


@pytest.mark.parametrize("text,argv,match", [
    (MIX.replace("max_repetition = 2", "max_repetion = 2"), (),
     r"data.sources\[1\]: unknown key 'max_repetion' \(did you mean 'max_repetition'\?\)"),
    (MIX.replace("target_ratio = 0.3", 'target_ratio = "a third"'), (), r"data.sources\[1\].target_ratio: expected"),
    (MIX.replace('paths = ["web/*.npy"]', 'paths = "web/*.npy"'), (), r"data.sources\[0\].paths: expected a list"),
    ("[data]\nsources = [1, 2]\n", (), r"data.sources: expected \[\[data.sources\]\] tables"),
    (MIX, ("--data.sources", "web"), r"data.sources: write these as \[\[data.sources\]\] tables in the TOML file"),
])
def test_source_table_errors_are_one_line(tmp_path, text, argv, match):
    with pytest.raises(ConfigError, match=match) as e:
        _load(tmp_path, text, argv)
    assert "\n" not in str(e.value)


def test_a_dataset_named_after_the_files_wins_and_a_later_file_means_memmap(tmp_path):
    base = "[data]\ndataset = \"pydoc\"\n"
    (tmp_path / "base.toml").write_text(base)
    cfg = _load(tmp_path, 'extends = "base.toml"\n' + MIX)  # the sources come after the base's dataset
    assert cfg.data.dataset == "memmap"
    cfg = _load(tmp_path, base, ["--data.paths=[a.npy,b.npy]"])
    assert cfg.data.dataset == "memmap" and cfg.data.memmap_paths == ["a.npy", "b.npy"]
    cfg = _load(tmp_path, "[data]\ndataset = \"pydoc\"\nmemmap_paths = [\"a.npy\"]\n")  # same file: as written
    assert cfg.data.dataset == "pydoc"


def test_olmo_fine_tuning_command_line(tmp_path):
    (tmp_path / "cfg.toml").write_text("[training]\nsteps = 3\n")
    argv = ["--job.config_file", "other.toml", str(tmp_path / "cfg.toml"), "--data.paths=[ids.npy]",
            "--data.label_mask_paths=[mask.npy]", "--load_path=ckpt/step-10", "--reset_trainer_state"]
    cfg = load_config(argv, env={})
    assert cfg.job.config_file == str(tmp_path / "cfg.toml") and cfg.training.steps == 3
    assert (cfg.data.dataset, cfg.data.memmap_paths, cfg.data.memmap_label_mask_paths) == \
        ("memmap", ["ids.npy"], ["mask.npy"])
    c = cfg.checkpoint
    assert (c.initial_load_path, c.reset_trainer_state, c.initial_load_model_only) == ("ckpt/step-10", True, False)
    # OLMo's --load_path alone resumes everything; our own key keeps its default (weights only).
    assert load_config(["--load_path", "x"], env={}).checkpoint.initial_load_model_only is False
    assert load_config(["--checkpoint.initial_load_path", "x"], env={}).checkpoint.initial_load_model_only is True


def test_the_documented_dolma_style_mixture_loads_and_its_ratios_sum_to_one(tmp_path):
    import os

    from torchtitan.datasets.mixture import check_ratios

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    text = open(os.path.join(root, "docs", "datasets.md")).read()
    block = text.split("### Example: a Dolma-style mixture", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    base = os.path.join(root, "train_configs", "olmo_7b.toml")
    block = block.replace('extends = "olmo_7b.toml"', f'extends = "{base}"')
    cfg = _load(tmp_path, block)
    assert cfg.data.dataset == "memmap" and len(cfg.data.sources) == 15
    check_ratios(cfg.data.sources)
