"""OLMoE family (model.name = "olmoe"): the one decoder with mixture-of-experts feed-forwards, and its HF adapter."""
from torchtitan.models.common.spec import TrainSpec
from torchtitan.models.olmoe.adapter import OlmoeStateDictAdapter
from torchtitan.models.olmoe.args import OlmoeModelArgs, olmoe_flavors

__all__ = ["OlmoeModelArgs", "OlmoeStateDictAdapter", "olmoe_flavors", "get_train_spec"]


def get_train_spec() -> TrainSpec:
    return TrainSpec(name="olmoe", flavors=olmoe_flavors, state_dict_adapter=OlmoeStateDictAdapter)
