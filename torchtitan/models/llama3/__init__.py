"""Llama 3 family (model.name = "llama3"): the one decoder with Llama's args, flavors and HF adapter."""
from torchtitan.models.common.spec import TrainSpec
from torchtitan.models.llama3.adapter import Llama3StateDictAdapter
from torchtitan.models.llama3.args import LlamaModelArgs, llama3_flavors

__all__ = ["LlamaModelArgs", "Llama3StateDictAdapter", "llama3_flavors", "get_train_spec"]


def get_train_spec() -> TrainSpec:
    return TrainSpec(name="llama3", flavors=llama3_flavors, state_dict_adapter=Llama3StateDictAdapter)
