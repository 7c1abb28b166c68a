"""DeepSeek-V3 native <-> transformers' DeepseekV3ForCausalLM: names, the expert stacks, config.json.

HF files hold one tensor per expert (`mlp.experts.E.{gate,up,down}_proj.weight`, as the released files and
transformers 5.x save_pretrained write them); the stacking is models/common/adapter.py's. The router's
`e_score_correction_bias` is our expert bias. RoPE rotates adjacent pairs in both (transformers'
rope_interleave = true), so no permutation. The released DeepSeek-V3 folder stores FP8 blocks with
`weight_scale_inv` tensors: those are refused by name (dequantize first). What DeepseekV3ForCausalLM cannot say
is refused by name, never exported wrong.
"""
from __future__ import annotations

import re
from typing import Any

from torchtitan.models.common.adapter import (
    HF_DECODER_TABLE,
    StateDictAdapter,
    hf_rope_fields,
    hf_rope_params,
    yarn_from_hf,
)
from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.mla import MLAArgs
from torchtitan.models.common.rope import YarnScaling
from torchtitan.models.deepseek_v3.args import DeepseekV3ModelArgs, deepseek_moe
from torchtitan.tools.errors import CheckpointError

HF_EXPERT_STACKS = {
    "layers.{}.feed_forward.experts.w1": "model.layers.{}.mlp.experts.{}.gate_proj.weight",
    "layers.{}.feed_forward.experts.w3": "model.layers.{}.mlp.experts.{}.up_proj.weight",
    "layers.{}.feed_forward.experts.w2": "model.layers.{}.mlp.experts.{}.down_proj.weight",
}
_ATTN = "model.layers.{}.self_attn."
_QUANTIZED = re.compile(r"weight_scale_inv$")
TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 1}


def deepseek_cannot_express(a: DecoderArgs) -> list[str]:
    m = a.moe
    if m is None:
        return ["moe is None (DeepSeek-V3's layers after the first dense ones are MoE)"]
    checks = [
        (a.attention != "mla", f"attention = {a.attention!r} (multi-head latent attention only)"),
        ((m.score_func, m.norm_topk_prob, m.expert_bias) != ("sigmoid", True, True),
         "moe.score_func/norm_topk_prob/expert_bias differ from sigmoid/True/True"),
        (m.shared_expert_hidden_dim % m.hidden_dim or not m.shared_expert_hidden_dim,
         f"moe.shared_expert_hidden_dim = {m.shared_expert_hidden_dim} (a multiple of the expert width)"),
        (m.sparse_step != 1 or m.dense_layer_ids or m.router_bias or m.expert_linear_bias or m.gate != "swiglu",
         "moe layer selection, biases or gate other than DeepSeek's"),
        ((a.norm, a.block, a.qk_norm, a.rope_layout, a.tie_word_embeddings, a.clip_qkv, a.sliding_window) !=
         ("rms", "pre_norm", None, "interleaved", False, None, None),
         "norm/block/qk_norm/rope_layout/tying/clip_qkv/sliding_window differ from "
         "rms/pre_norm/None/interleaved/untied/None/None"),
        (a.rope_scaling is not None and not isinstance(a.rope_scaling, YarnScaling), "rope_scaling is not yarn"),
    ]
    return [msg for bad, msg in checks if bad]


class DeepseekV3StateDictAdapter(StateDictAdapter):
    hf_model_type = "deepseek_v3"
    hf_architecture = "DeepseekV3ForCausalLM"
    to_hf_table = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "layers.{}.attention.wq.weight": _ATTN + "q_proj.weight",
        "layers.{}.attention.wq_a.weight": _ATTN + "q_a_proj.weight",
        "layers.{}.attention.q_norm.weight": _ATTN + "q_a_layernorm.weight",
        "layers.{}.attention.wq_b.weight": _ATTN + "q_b_proj.weight",
        "layers.{}.attention.wkv_a.weight": _ATTN + "kv_a_proj_with_mqa.weight",
        "layers.{}.attention.kv_norm.weight": _ATTN + "kv_a_layernorm.weight",
        "layers.{}.attention.wkv_b.weight": _ATTN + "kv_b_proj.weight",
        "layers.{}.attention.wo.weight": _ATTN + "o_proj.weight",
        **{k: v for k, v in HF_DECODER_TABLE.items() if ".feed_forward." in k},
        "layers.{}.feed_forward.shared_expert.w1.weight": "model.layers.{}.mlp.shared_experts.gate_proj.weight",
        "layers.{}.feed_forward.shared_expert.w2.weight": "model.layers.{}.mlp.shared_experts.down_proj.weight",
        "layers.{}.feed_forward.shared_expert.w3.weight": "model.layers.{}.mlp.shared_experts.up_proj.weight",
        "layers.{}.feed_forward.router.gate.weight": "model.layers.{}.mlp.gate.weight",
        "layers.{}.feed_forward.router.expert_bias": "model.layers.{}.mlp.gate.e_score_correction_bias",
        "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
        "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    expert_stacks = HF_EXPERT_STACKS
    args_cls: type[DecoderArgs] = DeepseekV3ModelArgs

    def cannot_express(self) -> list[str]:
        return deepseek_cannot_express(self.args)

    def native_key(self, hf_key: str) -> str | None:
        if _QUANTIZED.search(hf_key):
            raise CheckpointError(f"HF tensor {hf_key!r} is an FP8 block scale (a quantized checkpoint); "
                                  f"dequantize the folder to bfloat16 first and import that")
        return super().native_key(hf_key)

    def family_hf_config(self, dtype: str) -> dict[str, Any]:
        a, m, mla = self.args, self.args.moe, self.args.mla
        rope, scaling = hf_rope_fields(a.rope_theta, a.rope_scaling)
        return {
            "rms_norm_eps": a.norm_eps, "q_lora_rank": mla.q_lora_rank or None, "kv_lora_rank": mla.kv_lora_rank,
            "qk_nope_head_dim": mla.qk_nope_head_dim, "qk_rope_head_dim": mla.qk_rope_head_dim,
            "v_head_dim": mla.v_head_dim, "head_dim": mla.qk_rope_head_dim, "rope_interleave": True,
            "moe_intermediate_size": m.hidden_dim, "n_routed_experts": m.num_experts,
            "num_experts_per_tok": m.top_k, "n_shared_experts": m.shared_expert_hidden_dim // m.hidden_dim,
            "first_k_dense_replace": m.n_dense_layers, "n_group": m.n_group, "topk_group": m.topk_group,
            "routed_scaling_factor": m.route_scale, "norm_topk_prob": True, "scoring_func": "sigmoid",
            "topk_method": "noaux_tc", "rope_scaling": scaling, "rope_parameters": rope,
            "attention_dropout": 0.0, "initializer_range": a.init_std, "use_cache": True, "dtype": dtype,
            # Ids outside the vocabulary (a debug model with a small tokenizer) would break transformers.
            **{k: (v if v < a.vocab_size else None) for k, v in TOKEN_IDS.items()},
        }

    @classmethod
    def args_from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> DecoderArgs:
        # MLA's q/k head width is not hidden / heads: the common check must not see head_dim.
        common = cls.common_args_from_hf({k: v for k, v in config.items() if k != "head_dim"}, source)
        common.pop("head_dim", None)
        if config.get("rope_interleave") is False:
            raise CheckpointError(f"HF checkpoint {source}: rope_interleave is false; our latent attention rotates "
                                  f"adjacent pairs (DeepSeek's layout) only")
        if config.get("scoring_func", "sigmoid") != "sigmoid" or config.get("topk_method", "noaux_tc") != "noaux_tc":
            raise CheckpointError(f"HF checkpoint {source}: scoring_func {config.get('scoring_func')!r} / topk_method "
                                  f"{config.get('topk_method')!r}: only sigmoid / noaux_tc (DeepSeek-V3's) are "
                                  f"supported")
        try:
            mla = MLAArgs(q_lora_rank=int(config.get("q_lora_rank") or 0), kv_lora_rank=int(config["kv_lora_rank"]),
                          qk_nope_head_dim=int(config["qk_nope_head_dim"]),
                          qk_rope_head_dim=int(config["qk_rope_head_dim"]), v_head_dim=int(config["v_head_dim"]))
            moe = deepseek_moe(int(config["n_routed_experts"]), int(config["moe_intermediate_size"]),
                               int(config["num_experts_per_tok"]), int(config.get("n_shared_experts") or 0),
                               int(config.get("first_k_dense_replace") or 0),
                               float(config.get("routed_scaling_factor", 1.0)), int(config.get("n_group") or 1),
                               int(config.get("topk_group") or 1))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"HF checkpoint {source}: config.json has a bad or missing latent-attention or "
                                  f"expert field ({e})") from None
        if not config.get("norm_topk_prob", True):
            raise CheckpointError(f"HF checkpoint {source}: norm_topk_prob is false; DeepSeek-V3 renormalizes the "
                                  f"chosen experts' scores")
        rope = hf_rope_params(config)
        if rope["rope_type"] not in ("default", "yarn"):
            raise CheckpointError(f"HF checkpoint {source}: rope_type {rope['rope_type']!r} is not supported for "
                                  f"DeepSeek-V3 (default, yarn)")
        scaling = yarn_from_hf(rope, config, source, "rope_parameters") if rope["rope_type"] == "yarn" else None
        return cls.args_cls(**common, ffn_hidden_dim=int(config["intermediate_size"]), mla=mla, moe=moe,
                            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                            rope_theta=float(rope.get("rope_theta", 10000.0)), rope_scaling=scaling)
