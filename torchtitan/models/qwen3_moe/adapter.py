"""Qwen3-MoE native <-> transformers' Qwen3MoeForCausalLM: Qwen3's names plus the router and expert stacks.

HF files hold one tensor per expert (`model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`, the released
files and what transformers 5.x save_pretrained writes); the stacking is models/common/adapter.py's. Dense
layers (mlp_only_layers, decoder_sparse_step) keep Qwen3's `mlp.{gate,up,down}_proj` names. What the format
cannot say is refused by name: a shared expert, sigmoid scores, an expert bias, leading dense layers given as
n_dense_layers (write them as dense_layer_ids), and whatever Qwen3's attention cannot.
"""
from __future__ import annotations

from typing import Any

from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.moe import MoEArgs
from torchtitan.models.qwen3.adapter import QWEN3_TABLE, Qwen3StateDictAdapter, qwen3_attention_from_hf
from torchtitan.models.qwen3_moe.args import Qwen3MoeModelArgs
from torchtitan.tools.errors import CheckpointError

HF_EXPERT_STACKS = {
    "layers.{}.feed_forward.experts.w1": "model.layers.{}.mlp.experts.{}.gate_proj.weight",
    "layers.{}.feed_forward.experts.w3": "model.layers.{}.mlp.experts.{}.up_proj.weight",
    "layers.{}.feed_forward.experts.w2": "model.layers.{}.mlp.experts.{}.down_proj.weight",
}
# Qwen3MoeConfig's values for keys a config.json leaves out.
HF_DEFAULTS = {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": False,
               "decoder_sparse_step": 1, "mlp_only_layers": []}
ROUTER_AUX_LOSS_COEF = 0.001  # the released models'; transformers applies it only when asked for router logits


class Qwen3MoeStateDictAdapter(Qwen3StateDictAdapter):
    hf_model_type = "qwen3_moe"
    hf_architecture = "Qwen3MoeForCausalLM"
    to_hf_table = {**QWEN3_TABLE, "layers.{}.feed_forward.router.gate.weight": "model.layers.{}.mlp.gate.weight"}
    expert_stacks = HF_EXPERT_STACKS
    args_cls: type[DecoderArgs] = Qwen3MoeModelArgs

    def expert_problems(self) -> list[str]:
        m = self.args.moe
        if m is None:
            return ["moe is None (a dense model is qwen3's)"]
        return [msg for bad, msg in (
            (m.shared_expert_hidden_dim > 0, f"moe.shared_expert_hidden_dim = {m.shared_expert_hidden_dim} "
                                             f"(no shared expert)"),
            (m.score_func != "softmax", f"moe.score_func = {m.score_func!r} (softmax only)"),
            (m.expert_bias, "moe.expert_bias = True (no expert bias)"),
            (m.n_dense_layers > 0, f"moe.n_dense_layers = {m.n_dense_layers} (give dense layers as "
                                   f"moe.dense_layer_ids)"),
        ) if bad]

    def family_hf_config(self, dtype: str) -> dict[str, Any]:
        m = self.args.moe
        return {
            **super().family_hf_config(dtype),
            "num_experts": m.num_experts, "num_experts_per_tok": m.top_k, "moe_intermediate_size": m.hidden_dim,
            "norm_topk_prob": m.norm_topk_prob, "decoder_sparse_step": m.sparse_step,
            "mlp_only_layers": list(m.dense_layer_ids), "router_aux_loss_coef": ROUTER_AUX_LOSS_COEF,
            "output_router_logits": False,
        }

    @classmethod
    def args_from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> DecoderArgs:
        common = cls.common_args_from_hf(config, source)
        # Qwen3MoeConfig has no head_dim default: a file without one means hidden_size / heads.
        common.setdefault("head_dim", common["dim"] // common["n_heads"])
        try:
            # num_local_experts: what Qwen3MoeConfig writes for num_experts (its attribute map).
            experts = config.get("num_local_experts") or _hf_value(config, "num_experts")
            moe = MoEArgs(num_experts=int(experts),
                          top_k=int(_hf_value(config, "num_experts_per_tok")),
                          hidden_dim=int(_hf_value(config, "moe_intermediate_size")),
                          norm_topk_prob=bool(_hf_value(config, "norm_topk_prob")),
                          sparse_step=int(_hf_value(config, "decoder_sparse_step")),
                          dense_layer_ids=tuple(int(i) for i in _hf_value(config, "mlp_only_layers")))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"HF checkpoint {source}: config.json has a bad or missing expert field "
                                  f"({e})") from None
        return cls.args_cls(**common, ffn_hidden_dim=int(config["intermediate_size"]), moe=moe,
                            **qwen3_attention_from_hf(config, source))


def _hf_value(config: dict[str, Any], key: str) -> Any:
    """config[key], or Qwen3MoeConfig's default where the file leaves it out or null."""
    return HF_DEFAULTS[key] if config.get(key) is None else config[key]
