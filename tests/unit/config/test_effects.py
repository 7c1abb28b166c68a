"""Options set by the user that would have no effect: an error naming the key and what it needs."""
from __future__ import annotations

import glob
import os
import re

import pytest

from torchtitan.config import ConfigError, load_config
from torchtitan.config.manager import iter_fields
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.trainer.checks import check_config, layout_notes
from torchtitan.trainer.effects import REQUIREMENTS, effect_notes
from torchtitan.trainer.plan import autocast_dtype


def checked(argv, env):
    """The config as a job sees it: loaded, then checked (trainer/checks.py)."""
    cfg = load_config(argv, env)
    check_config(cfg)
    return cfg


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.mark.parametrize("args,key,needs", [
    (["--checkpoint.interval", "5"], "checkpoint.interval", "checkpoint.enable = true"),
    (["--checkpoint.enable", "--checkpoint.last_save_model_only=false", "--checkpoint.export_dtype", "bfloat16"],
     "checkpoint.export_dtype", "last_save_model_only = true"),
    (["--checkpoint.initial_load_model_only=false"], "checkpoint.initial_load_model_only",
     "checkpoint.initial_load_path"),
    (["--training.dataset", "pydoc", "--training.memmap_paths", "a.npy"], "data.memmap_paths",
     'data.dataset = "memmap"'),
    (["--training.dataset", "memmap", "--training.memmap_paths", "a.npy", "--training.dataset_path", "x"],
     "data.dataset_path", "a text dataset"),
    (["--parallelism.pipeline_parallel_schedule", "GPipe"], "parallelism.pipeline_parallel_schedule",
     "pipeline_parallel_degree > 1"),
    (["--parallelism.context_parallel_rotate_method", "allgather"], "parallelism.context_parallel_rotate_method",
     "context_parallel_degree > 1"),
    (["--parallelism.tensor_parallel_degree", "2", "--training.loss_chunk_size", "128"], "training.loss_chunk_size",
     "disable_loss_parallel = true"),
    (["--float8.recipe_name", "rowwise"], "float8.recipe_name", 'model.converters = ["float8"]'),
    (["--activation_checkpoint.mode", "full", "--activation_checkpoint.selective_ac_option", "op"],
     "activation_checkpoint.selective_ac_option", 'mode = "selective"'),
    (["--compile.components", "model"], "compile.components", "compile.enable = true"),
    (["--optimizer.muon_ns_dtype", "bfloat16"], "optimizer.muon_ns_dtype", 'optimizer.name = "Muon"'),
    (["--metrics.save_tb_folder", "x"], "metrics.save_tb_folder", "metrics.enable_tensorboard = true"),
    (["--metrics.wandb_project", "p"], "metrics.wandb_project", "metrics.enable_wandb = true"),
    (["--metrics.wandb_mode", "offline"], "metrics.wandb_mode", "metrics.enable_wandb = true"),
])
def test_an_option_without_its_switch_is_an_error(args, key, needs):
    with pytest.raises(ConfigError, match=rf"^{key} \(set in the command line\) has no effect here: it needs .*"
                                          rf"{re.escape(needs)}"):
        checked(args, env={})


def test_the_same_options_with_their_switch_load():
    checked(["--checkpoint.enable", "--checkpoint.interval", "5", "--compile.enable", "--compile.components",
                 "model", "--parallelism.tensor_parallel_degree", "2", "--training.loss_chunk_size", "128",
                 "--parallelism.disable_loss_parallel"], env={})


def test_wandb_options_with_enable_wandb_load():
    cfg = checked(["--metrics.enable_wandb", "--metrics.wandb_project", "p", "--metrics.wandb_tags", "a,b",
                   "--metrics.wandb_mode", "offline"], env={})
    assert (cfg.metrics.wandb_project, cfg.metrics.wandb_tags, cfg.metrics.wandb_mode) == ("p", ["a", "b"], "offline")


def test_a_file_option_whose_switch_is_set_off_is_a_note(tmp_path):
    """The command line cannot remove a key from the file: a quick run of a production config without
    checkpointing must still start, and says what it ignores. A file that turns a feature off explicitly above
    its settings (torchtitan's own configs do: `[validation] enabled = false`, `freq = 5`) keeps them for later:
    a note too. A setting whose switch nobody set is an error: the switch was forgotten."""
    path = tmp_path / "c.toml"
    path.write_text("[checkpoint]\nenable = true\ninterval = 100\nkeep_latest_k = 3\n")
    cfg = checked(["--job.config_file", str(path), "--checkpoint.no-enable"], env={})
    notes = effect_notes(cfg)
    assert len(notes) == 2 and notes[0].startswith(f"checkpoint.interval (from {path}) has no effect")
    with pytest.raises(ConfigError, match="checkpoint.interval .set in the command line. has no effect"):
        checked(["--job.config_file", str(path), "--checkpoint.no-enable", "--checkpoint.interval", "5"], env={})
    path.write_text("[checkpoint]\nenable = false\ninterval = 100\n")
    assert effect_notes(checked(["--job.config_file", str(path)], env={})) == [
        f"checkpoint.interval (from {path}) has no effect: checkpoint.enable is off"]
    path.write_text("[checkpoint]\ninterval = 100\n")
    with pytest.raises(ConfigError, match="checkpoint.interval .set in .*c.toml. has no effect"):
        checked(["--job.config_file", str(path)], env={})


def test_shipped_configs_and_defaults_have_no_dead_options():
    assert not effect_notes(checked([], env={}))
    for path in glob.glob(os.path.join(ROOT, "train_configs", "*.toml")):
        assert not effect_notes(checked(["--job.config_file", path], env={})), path


def test_every_rule_names_real_keys():
    keys = {f"{sec}.{name}" for sec, name, *_ in iter_fields()}
    for req in REQUIREMENTS:
        assert set(req.keys) <= keys and req.switch in keys, req


def test_layout_and_device_notes():
    cfg = checked(["--training.enable_cpu_offload", "--training.mixed_precision_param", "bfloat16",
                       "--training.mixed_precision_reduce", "float32"], env={})
    one, two = (ParallelDims.from_config(cfg.parallelism, w) for w in (1, 2))
    notes = layout_notes(cfg, one, "cpu")
    assert [n.split(" ")[0] for n in notes] == ["training.enable_cpu_offload", "training.mixed_precision_reduce",
                                                "training.mixed_precision_param"]
    assert layout_notes(cfg, two, "cuda") == []
    host = checked(["--training.cpu_keep_freed_memory", "false"], env={})
    assert layout_notes(host, one, "cpu") == []
    assert layout_notes(host, one, "cuda")[0].startswith("training.cpu_keep_freed_memory has no effect on cuda")
    # mixed_precision_param takes effect everywhere on CUDA: FSDP's policy, or autocast without FSDP.
    assert str(autocast_dtype(cfg, one, "cuda")) == "torch.bfloat16"
    assert autocast_dtype(cfg, two, "cuda") is None and autocast_dtype(cfg, one, "cpu") is None
