"""Qwen3-MoE family (model.name = "qwen3_moe"): the one decoder with Qwen3's attention and MoE feed-forwards."""
from torchtitan.models.common.spec import TrainSpec
from torchtitan.models.qwen3_moe.adapter import Qwen3MoeStateDictAdapter
from torchtitan.models.qwen3_moe.args import Qwen3MoeModelArgs, qwen3_moe_flavors

__all__ = ["Qwen3MoeModelArgs", "Qwen3MoeStateDictAdapter", "qwen3_moe_flavors", "get_train_spec"]


def get_train_spec() -> TrainSpec:
    return TrainSpec(name="qwen3_moe", flavors=qwen3_moe_flavors, state_dict_adapter=Qwen3MoeStateDictAdapter)
