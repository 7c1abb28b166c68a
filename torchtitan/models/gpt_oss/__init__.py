"""gpt-oss family (model.name = "gpt_oss"): the one decoder with attention sinks and biased MoE experts."""
from torchtitan.models.common.spec import TrainSpec
from torchtitan.models.gpt_oss.adapter import GptOssStateDictAdapter
from torchtitan.models.gpt_oss.args import GptOssModelArgs, gpt_oss_flavors

__all__ = ["GptOssModelArgs", "GptOssStateDictAdapter", "gpt_oss_flavors", "get_train_spec"]


def get_train_spec() -> TrainSpec:
    return TrainSpec(name="gpt_oss", flavors=gpt_oss_flavors, state_dict_adapter=GptOssStateDictAdapter)
