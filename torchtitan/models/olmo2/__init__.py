"""OLMo 2 family (model.name = "olmo2"): the one decoder with OLMo 2's args, flavors and HF adapter."""
from torchtitan.models.common.spec import TrainSpec
from torchtitan.models.olmo2.adapter import Olmo2StateDictAdapter
from torchtitan.models.olmo2.args import Olmo2ModelArgs, olmo2_flavors

__all__ = ["Olmo2ModelArgs", "Olmo2StateDictAdapter", "olmo2_flavors", "get_train_spec"]


def get_train_spec() -> TrainSpec:
    return TrainSpec(name="olmo2", flavors=olmo2_flavors, state_dict_adapter=Olmo2StateDictAdapter)
