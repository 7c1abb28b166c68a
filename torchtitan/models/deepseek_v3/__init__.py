"""DeepSeek-V3 family (model.name = "deepseek_v3"): the one decoder with latent attention and DeepSeek's MoE."""
from torchtitan.models.common.spec import TrainSpec
from torchtitan.models.deepseek_v3.adapter import DeepseekV3StateDictAdapter
from torchtitan.models.deepseek_v3.args import DeepseekV3ModelArgs, deepseek_v3_flavors

__all__ = ["DeepseekV3ModelArgs", "DeepseekV3StateDictAdapter", "deepseek_v3_flavors", "get_train_spec"]


def get_train_spec() -> TrainSpec:
    return TrainSpec(name="deepseek_v3", flavors=deepseek_v3_flavors, state_dict_adapter=DeepseekV3StateDictAdapter)
