"""Which layers float8 converts (the conversion itself needs torchao on a float8-capable GPU)."""
import pytest
from torch import nn

from torchtitan.components.float8 import float8_eligible
from torchtitan.config.job_config import JobConfig
from torchtitan.config.manager import ConfigError
from torchtitan.trainer.plan import make_plan


def test_eligibility():
    assert float8_eligible(nn.Linear(64, 128), "layers.0.attention.wq", ["output"])
    assert not float8_eligible(nn.Linear(64, 128), "output", ["output"])
    assert not float8_eligible(nn.Linear(60, 128), "layers.0.feed_forward.w1", ["output"])
    assert not float8_eligible(nn.LayerNorm(64), "norm", [])


def test_float8_on_cpu_is_a_config_error(monkeypatch):
    monkeypatch.setenv("TORCHTITAN_FORCE_CPU", "1")
    cfg = JobConfig()
    cfg.model.converters = ["float8"]
    with pytest.raises(ConfigError, match="float8 needs a CUDA GPU"):
        make_plan(cfg, 1)
