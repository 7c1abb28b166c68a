"""float8's decisions for the GPU job, checked without torchao or a GPU: which Linear layers of the debug model it
would convert (the module filter it hands to torchao) and that the plan applies it on CUDA only."""
from __future__ import annotations

import importlib.util

import pytest
from torch import nn

from torchtitan.components.float8 import convert_to_float8, float8_eligible
from torchtitan.config.job_config import Float8, JobConfig
from torchtitan.models import get_train_spec
from torchtitan.tools.errors import ConfigError
from torchtitan.trainer.plan import make_plan


def _linears() -> dict[str, nn.Linear]:
    spec = get_train_spec("llama3")
    model = spec.build_meta_model(spec.model_args("debugmodel"))
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_debug_model_converts_every_block_linear_and_keeps_the_output_in_bf16():
    linears, cfg = _linears(), Float8()
    converted = {fqn for fqn, m in linears.items() if float8_eligible(m, fqn, cfg.filter_fqns)}
    assert converted == set(linears) - {"output"}
    assert {fqn.rsplit(".", 1)[-1] for fqn in converted} == {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}


def test_filter_fqns_keep_matching_layers_out():
    linears = _linears()
    converted = {fqn for fqn, m in linears.items() if float8_eligible(m, fqn, ["output", "attention.wk"])}
    assert not any(fqn.endswith("attention.wk") for fqn in converted) and "layers.0.attention.wq" in converted


def test_plan_applies_float8_on_cuda():
    cfg = JobConfig()
    cfg.model.converters = ["float8"]
    assert make_plan(cfg, 1, device_type="cuda").float8


@pytest.mark.skipif(importlib.util.find_spec("torchao") is not None, reason="torchao installed")
def test_without_torchao_the_converter_is_a_config_error():
    with pytest.raises(ConfigError, match="needs torchao"):
        convert_to_float8(nn.Linear(16, 16), Float8())
