"""OLMoE native <-> transformers' OlmoeForCausalLM: names, the expert stacks, config.json.

OLMoE is a pre-norm RMSNorm decoder with QK-norm over the whole projection width (OLMo 2's) and every
feed-forward a mixture of experts. HF files hold one tensor per expert,
`model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight` (the released allenai/OLMoE-1B-7B-0924 files, and
what transformers 5.x save_pretrained writes although it fuses the experts in memory); ours stacks each
projection's experts into one (E, out, in) tensor. So an export unstacks and an import stacks: to_hf / from_hf
take whole state dicts or whole blocks (every caller passes those), and a caller that wants only names or
shapes passes meta tensors through them (the stacking is models/common/adapter.py's, from `expert_stacks`).

What OLMoE's HF format cannot say is refused by name, never dropped: a shared expert, sigmoid scores, an
expert bias, dense leading layers, RoPE scaling, sliding windows, and clip_qkv (transformers' Olmoe clips after
the QK-norm, our attention before it).
"""
from __future__ import annotations

from typing import Any

from torchtitan.models.common.adapter import HF_DECODER_TABLE, hf_rope_params
from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.moe import MoEArgs
from torchtitan.models.olmo.adapter import OlmoStateDictAdapter
from torchtitan.models.olmoe.args import OlmoeModelArgs
from torchtitan.tools.errors import CheckpointError

# Native expert stack -> the HF name of one expert's slice: the first {} is the layer, the second the expert.
HF_EXPERT_STACKS = {
    "layers.{}.feed_forward.experts.w1": "model.layers.{}.mlp.experts.{}.gate_proj.weight",
    "layers.{}.feed_forward.experts.w3": "model.layers.{}.mlp.experts.{}.up_proj.weight",
    "layers.{}.feed_forward.experts.w2": "model.layers.{}.mlp.experts.{}.down_proj.weight",
}
# What OlmoeConfig assumes for keys a config.json leaves out.
HF_DEFAULTS = {"num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "rms_norm_eps": 1e-5,
               "rope_theta": 10000.0}
ROUTER_AUX_LOSS_COEF = 0.01  # the released model's; transformers applies it only when asked for router logits


def hf_cannot_express(a: DecoderArgs) -> list[str]:
    """What in `a` OlmoeForCausalLM cannot compute, one phrase each (empty: exportable)."""
    m = a.moe
    if m is None:
        return ["moe is None (every OLMoE feed-forward is a mixture of experts)"]
    checks = [
        (m.shared_expert_hidden_dim > 0,
         f"moe.shared_expert_hidden_dim = {m.shared_expert_hidden_dim} (no shared expert)"),
        (m.score_func != "softmax", f"moe.score_func = {m.score_func!r} (softmax only)"),
        (m.expert_bias, "moe.expert_bias = True (no expert bias)"),
        (m.n_dense_layers > 0, f"moe.n_dense_layers = {m.n_dense_layers} (every layer MoE)"),
        (m.sparse_step != 1 or m.dense_layer_ids != (), "moe.sparse_step / dense_layer_ids leave dense layers "
         "(every layer MoE)"),
        (a.clip_qkv is not None, f"clip_qkv = {a.clip_qkv} (transformers clips after the QK-norm, we before)"),
        (a.rope_scaling is not None, "rope_scaling is set (plain RoPE only)"),
        (a.sliding_window is not None, f"sliding_window = {a.sliding_window} (full attention only)"),
        ((a.norm, a.block, a.qk_norm, a.rope_layout) != ("rms", "pre_norm", "width", "half"),
         "norm/block/qk_norm/rope_layout differ from rms/pre_norm/width/half"),
    ]
    return [msg for bad, msg in checks if bad]


class OlmoeStateDictAdapter(OlmoStateDictAdapter):
    hf_model_type = "olmoe"
    hf_architecture = "OlmoeForCausalLM"
    to_hf_table = {
        **{k: v for k, v in HF_DECODER_TABLE.items() if ".feed_forward." not in k},
        "layers.{}.attention.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
        "layers.{}.attention.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
        "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
        "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
        "layers.{}.feed_forward.router.gate.weight": "model.layers.{}.mlp.gate.weight",
        "norm.weight": "model.norm.weight",
    }
    expert_stacks = HF_EXPERT_STACKS
    args_cls: type[DecoderArgs] = OlmoeModelArgs
    # OLMo's GPT-NeoX-20B tokenizer ids, as in OLMoE-1B-7B-0924's config.json.
    token_ids = OlmoStateDictAdapter.token_ids

    def cannot_express(self) -> list[str]:
        return hf_cannot_express(self.args)

    # ----------------------------------------------------------------- config
    def family_hf_config(self, dtype: str) -> dict[str, Any]:
        self.check_expressible()
        a, m = self.args, self.args.moe
        return {
            **super().family_hf_config(dtype),  # OLMo's: token ids, rope_scaling None, dropout, init range
            "intermediate_size": m.hidden_dim,  # transformers' Olmoe has no dense feed-forward: the expert width
            "num_experts": m.num_experts,
            "num_experts_per_tok": m.top_k,
            "norm_topk_prob": m.norm_topk_prob,
            "router_aux_loss_coef": ROUTER_AUX_LOSS_COEF,
            "output_router_logits": False,
            # 4.x reads the top-level rope_theta (written by hf_config); 5.x rope_parameters.
            "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
            "dtype": dtype,
        }

    def norm_hf_config(self) -> dict[str, Any]:
        return {"rms_norm_eps": self.args.norm_eps, "clip_qkv": None}

    @classmethod
    def args_from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> DecoderArgs:
        common = cls.common_args_from_hf(config, source)
        rope = hf_rope_params(config)
        if rope["rope_type"] != "default" or float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise CheckpointError(f"HF checkpoint {source}: rope_scaling / rope_parameters {rope} is not supported for "
                                  f"OLMoE (plain RoPE over the whole head only)")
        if config.get("clip_qkv") is not None:
            raise CheckpointError(f"HF checkpoint {source}: clip_qkv {config['clip_qkv']} is not supported for OLMoE "
                                  f"(transformers clips q, k, v after the QK-norm, our attention before it)")
        try:
            hidden = int(config["intermediate_size"])
            # num_local_experts: OlmoeConfig's alias of num_experts.
            experts = config.get("num_local_experts") or _hf_value(config, "num_experts")
            moe = MoEArgs(num_experts=int(experts),
                          top_k=int(_hf_value(config, "num_experts_per_tok")), hidden_dim=hidden,
                          norm_topk_prob=bool(_hf_value(config, "norm_topk_prob")))
            norm_eps = float(_hf_value(config, "rms_norm_eps"))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"HF checkpoint {source}: config.json has a bad or missing expert or norm field "
                                  f"({e})") from None
        return cls.args_cls(**common, ffn_hidden_dim=hidden, moe=moe, norm_eps=norm_eps,
                            rope_theta=float(rope.get("rope_theta", HF_DEFAULTS["rope_theta"])))


def _hf_value(config: dict[str, Any], key: str) -> Any:
    """config[key], or OlmoeConfig's default where the file leaves it out or null."""
    return HF_DEFAULTS[key] if config.get(key) is None else config[key]
