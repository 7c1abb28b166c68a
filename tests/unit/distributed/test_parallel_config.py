"""Parallelism settings that cannot be honoured fail at config time with the key and the fix."""
from __future__ import annotations

import types

import pytest

from torchtitan.config import ConfigError, load_config
from torchtitan.config.preflight import preflight
from torchtitan.distributed.context_parallel import apply_cp
from torchtitan.models.llama3.tensor_parallel import enable_async_tp


def _cfg(*args: str):
    return load_config(["--model.flavor", "debugmodel", "--training.seq_len", "64", *args], env={})


def test_compiled_loss_under_loss_parallel_is_rejected():
    cfg = _cfg("--parallelism.tensor_parallel_degree", "2", "--compile.enable")
    with pytest.raises(ConfigError, match="compile.components"):
        preflight(cfg, 2)
    preflight(_cfg("--parallelism.tensor_parallel_degree", "2", "--compile.enable", "--compile.components", "model"), 2)
    preflight(_cfg("--parallelism.tensor_parallel_degree", "2", "--compile.enable",
                   "--parallelism.disable_loss_parallel"), 2)


def test_async_tp_needs_cuda():
    with pytest.raises(ValueError, match="needs CUDA"):
        enable_async_tp(types.SimpleNamespace(device_type="cpu"))


def test_unknown_rotate_method_is_rejected():
    with pytest.raises(ValueError, match="context_parallel_rotate_method"):
        apply_cp(None, None, "ring")
