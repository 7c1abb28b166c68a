"""Model families, looked up lazily by `model.name` (importing this package registers nothing)."""
from __future__ import annotations

import importlib

from torchtitan.tools.errors import ConfigError

# name -> module with a `get_train_spec()`; an explicit table instead of import-time registration.
_TRAIN_SPEC_MODULES = {
    "llama3": "torchtitan.models.llama3",
    "olmo": "torchtitan.models.olmo",
    "olmo2": "torchtitan.models.olmo2",
    "olmo3": "torchtitan.models.olmo3",
    "olmoe": "torchtitan.models.olmoe",
    "qwen3": "torchtitan.models.qwen3",
    "gemma3": "torchtitan.models.gemma3",
    "gpt_oss": "torchtitan.models.gpt_oss",
    "deepseek_v3": "torchtitan.models.deepseek_v3",
    "qwen3_moe": "torchtitan.models.qwen3_moe",
}


def model_names() -> list[str]:
    return list(_TRAIN_SPEC_MODULES)


def get_train_spec(name: str):
    """The TrainSpec (models/common/spec.py) of family `name`."""
    if name not in _TRAIN_SPEC_MODULES:
        raise ConfigError(f"model.name {name!r} is not one of {', '.join(_TRAIN_SPEC_MODULES)}")
    return importlib.import_module(_TRAIN_SPEC_MODULES[name]).get_train_spec()


def spec_for_hf_model_type(model_type: str):
    """The family whose HF adapter reads transformers' `model_type`, or None."""
    for name in model_names():
        spec = get_train_spec(name)
        adapter = spec.state_dict_adapter
        if model_type in (adapter.hf_model_type, *adapter.also_reads_model_types):
            return spec
    return None
