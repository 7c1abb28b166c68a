"""OLMo 1 / 1.7 family (model.name = "olmo"): the one decoder with OLMo's args, flavors and HF adapter."""
from torchtitan.models.common.spec import TrainSpec
from torchtitan.models.olmo.adapter import OlmoStateDictAdapter
from torchtitan.models.olmo.args import OlmoModelArgs, olmo_flavors

__all__ = ["OlmoModelArgs", "OlmoStateDictAdapter", "olmo_flavors", "get_train_spec"]


def get_train_spec() -> TrainSpec:
    return TrainSpec(name="olmo", flavors=olmo_flavors, state_dict_adapter=OlmoStateDictAdapter)
