"""OLMo 3 family (model.name = "olmo3"): the one decoder with OLMo 3's args, flavors and HF adapter."""
from torchtitan.models.common.spec import TrainSpec
from torchtitan.models.olmo3.adapter import Olmo3StateDictAdapter
from torchtitan.models.olmo3.args import Olmo3ModelArgs, olmo3_flavors

__all__ = ["Olmo3ModelArgs", "Olmo3StateDictAdapter", "olmo3_flavors", "get_train_spec"]


def get_train_spec() -> TrainSpec:
    return TrainSpec(name="olmo3", flavors=olmo3_flavors, state_dict_adapter=Olmo3StateDictAdapter)
