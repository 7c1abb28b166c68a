"""Gemma 3 family (model.name = "gemma3"): the one decoder with Gemma 3's args, flavors and HF adapter (text)."""
from torchtitan.models.common.spec import TrainSpec
from torchtitan.models.gemma3.adapter import Gemma3StateDictAdapter
from torchtitan.models.gemma3.args import Gemma3ModelArgs, gemma3_flavors

__all__ = ["Gemma3ModelArgs", "Gemma3StateDictAdapter", "gemma3_flavors", "get_train_spec"]


def get_train_spec() -> TrainSpec:
    return TrainSpec(name="gemma3", flavors=gemma3_flavors, state_dict_adapter=Gemma3StateDictAdapter)
