"""Qwen3 family (model.name = "qwen3"): the one decoder with Qwen3's args, flavors and HF adapter."""
from torchtitan.models.common.spec import TrainSpec
from torchtitan.models.qwen3.adapter import Qwen3StateDictAdapter
from torchtitan.models.qwen3.args import Qwen3ModelArgs, qwen3_flavors

__all__ = ["Qwen3ModelArgs", "Qwen3StateDictAdapter", "qwen3_flavors", "get_train_spec"]


def get_train_spec() -> TrainSpec:
    return TrainSpec(name="qwen3", flavors=qwen3_flavors, state_dict_adapter=Qwen3StateDictAdapter)
