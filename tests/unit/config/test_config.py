import subprocess
import sys

import pytest

from tests.launch import ROOT, _env
from torchtitan.config import ConfigError, load_config, to_toml
from torchtitan.config.manager import iter_fields


def write(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_toml_cli_precedence(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 7\nseq_len = 128\n[optimizer]\nlr = 0.1\n")
    cfg = load_config(["--job.config_file", path, "--training.steps", "9", "--optimizer.lr=0.5"], env={})
    assert cfg.training.steps == 9  # CLI beats TOML
    assert cfg.training.seq_len == 128  # TOML beats default
    assert cfg.optimizer.lr == 0.5
    assert cfg.training.local_batch_size == 8  # default


def test_config_env_and_config_file_env(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 3\n")
    assert load_config([], env={"CONFIG": path}).training.steps == 3
    assert load_config([], env={"CONFIG_FILE": path}).training.steps == 3


def test_bool_flags_and_lists():
    cfg = load_config(["--checkpoint.enable_checkpoint", "--compile.enable=true", "--metrics.enable_jsonl=false",
                       "--compile.components", "model", "--parallelism.pipeline_parallel_split_points",
                       "layers.2,layers.4", "--parallelism.pipeline_parallel_degree", "3"], env={})
    assert cfg.checkpoint.enable and cfg.compile.enable and not cfg.metrics.enable_jsonl
    assert cfg.compile.components == ["model"]
    assert cfg.parallelism.pipeline_parallel_split_points == ["layers.2", "layers.4"]
    assert load_config(["--compile.enable", "--compile.no-enable"], env={}).compile.enable is False


def test_classic_aliases(tmp_path):
    cfg = load_config(["--training.data_parallel_replicate_degree", "2", "--training.data_parallel_shard_degree", "3",
                       "--training.tensor_parallel_degree", "4", "--experimental.pipeline_parallel_degree", "5",
                       "--experimental.context_parallel_degree", "6", "--checkpoint.model_weights_only=false",
                       "--checkpoint.interval_type", "seconds", "--training.batch_size", "11",
                       "--checkpoint.enable"], env={})
    p = cfg.parallelism
    assert (p.data_parallel_replicate_degree, p.data_parallel_shard_degree, p.tensor_parallel_degree,
            p.pipeline_parallel_degree, p.context_parallel_degree) == (2, 3, 4, 5, 6)
    assert cfg.checkpoint.last_save_model_only is False
    assert cfg.checkpoint.interval_type == "seconds"
    assert cfg.training.local_batch_size == 11
    path = write(tmp_path, "[checkpoint]\nenable_checkpoint = true\n[experimental]\npipeline_parallel_degree = 2\n")
    cfg = load_config(["--job.config_file", path], env={})
    assert cfg.checkpoint.enable and cfg.parallelism.pipeline_parallel_degree == 2


@pytest.mark.parametrize("argv,fragment", [
    (["--trainig.steps", "3"], "did you mean 'training'"),
    (["--training.stepz", "3"], "did you mean 'steps'"),
    (["--training.steps", "abc"], "training.steps: expected an integer"),
    (["--optimizer.lr", "fast"], "optimizer.lr: expected a number"),
    (["--optimizer.name", "SGD"], "optimizer.name: 'SGD' is not one of AdamW, Adam"),
    (["--checkpoint.enable=maybe"], "checkpoint.enable: expected true or false"),
    (["--training.steps"], "--training.steps needs a value"),
    (["--job.config_file", "/nonexistent/x.toml"], "config file not found: /nonexistent/x.toml"),
])
def test_errors(argv, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(argv, env={})
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_toml_errors(tmp_path):
    bad = write(tmp_path, "[training\nsteps = 3\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(["--job.config_file", bad], env={})
    wrong_type = write(tmp_path, "[training]\nsteps = \"many\"\n", "w.toml")
    with pytest.raises(ConfigError, match=r"w.toml: training.steps: expected an integer"):
        load_config(["--job.config_file", wrong_type], env={})
    unknown = write(tmp_path, "[modle]\nname = 'x'\n", "u.toml")
    with pytest.raises(ConfigError, match="did you mean 'model'"):
        load_config(["--job.config_file", unknown], env={})


def test_print_config_roundtrips(tmp_path):
    cfg = load_config(["--training.steps", "12", "--model.converters", "float8"], env={})
    text = to_toml(cfg)
    path = write(tmp_path, text)
    again = load_config(["--job.config_file", path], env={})
    again.job.config_file = cfg.job.config_file
    assert to_toml(again) == text


def test_every_field_documented():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen", f"{ROOT}/scripts/gen_config_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    doc = open(f"{ROOT}/docs/config.md").read()
    assert doc == gen.render(), "docs/config.md is stale: run python scripts/gen_config_docs.py"
    for section, name, *_ in iter_fields():
        assert f"`{section}.{name}`" in doc


def _main(args, env_extra=None):
    env = _env(env_extra)
    return subprocess.run([sys.executable, "-m", "torchtitan.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args,env,fragment", [
    (["--training.stepz", "3"], {}, "unknown config key 'training.stepz'"),
    (["--parallelism.tensor_parallel_degree", "3"], {"WORLD_SIZE": "4"}, "world size 4 is not divisible"),
    (["--parallelism.data_parallel_shard_degree", "2"], {"WORLD_SIZE": "4"}, "but the world size is 4"),
    (["--parallelism.tensor_parallel_degree", "3", "--parallelism.data_parallel_shard_degree", "1"],
     {"WORLD_SIZE": "3"}, "must divide the model's 16 attention heads"),
    (["--checkpoint.enable_checkpoint", "--checkpoint.create_seed_checkpoint"], {"WORLD_SIZE": "2"},
     "create_seed_checkpoint needs a single process"),
    (["--model.flavor", "9T"], {}, "model.flavor '9T' is not a llama3 flavor"),
])
def test_cli_errors_one_line_nonzero(args, env, fragment):
    proc = _main(args, env)
    assert proc.returncode != 0
    assert fragment in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr


def test_print_config_cli():
    proc = _main(["--job.print_config", "--training.steps", "4"])
    assert proc.returncode == 0
    assert "[training]" in proc.stdout and "steps = 4" in proc.stdout
