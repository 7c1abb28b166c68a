"""Qwen3 native <-> transformers' Qwen3ForCausalLM: names, config.json.

RoPE is rotate-half in both, so q/k need no permutation. The per-head QK-norm weights are (head_dim,) in both.
What Qwen3's HF format cannot say is refused by name, never exported wrong: experts (qwen3_moe's), sliding
windows, a whole-width QK-norm, clip_qkv, Llama 3.1 RoPE scaling, another norm or block.
"""
from __future__ import annotations

from typing import Any

from torchtitan.models.common.adapter import (
    HF_DECODER_TABLE,
    StateDictAdapter,
    hf_rope_fields,
    hf_rope_params,
    yarn_from_hf,
)
from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.rope import YarnScaling
from torchtitan.models.qwen3.args import Qwen3ModelArgs
from torchtitan.tools.errors import CheckpointError

QWEN3_TABLE = {
    **HF_DECODER_TABLE,
    "layers.{}.attention.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "layers.{}.attention.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "norm.weight": "model.norm.weight",
}
# Qwen3 tokenizer ids as in the released (post-trained) config.json files: <|endoftext|> and <|im_end|> (the
# -Base releases end documents with <|endoftext|>, 151643).
TOKEN_IDS = {"bos_token_id": 151643, "eos_token_id": 151645}


def qwen3_cannot_express(a: DecoderArgs) -> list[str]:
    """What in `a` Qwen3's attention and block cannot compute, one phrase each (shared with qwen3_moe)."""
    checks = [
        (a.sliding_window is not None, f"sliding_window = {a.sliding_window} (full attention only)"),
        (a.qk_norm != "head", f"qk_norm = {a.qk_norm!r} (per-head only)"),
        (a.clip_qkv is not None, f"clip_qkv = {a.clip_qkv} (no clipping)"),
        (a.rope_scaling is not None and not isinstance(a.rope_scaling, YarnScaling),
         "rope_scaling is not yarn (plain RoPE or yarn)"),
        ((a.norm, a.block, a.rope_layout, a.attention) != ("rms", "pre_norm", "half", "gqa"),
         "norm/block/rope_layout/attention differ from rms/pre_norm/half/gqa"),
    ]
    return [msg for bad, msg in checks if bad]


def qwen3_rope_from_hf(config: dict[str, Any], source: str) -> dict[str, Any]:
    """rope_theta and rope_scaling (plain or yarn) of a Qwen3 config.json."""
    rope = hf_rope_params(config)
    if rope["rope_type"] not in ("default", "yarn"):
        raise CheckpointError(f"HF checkpoint {source}: rope_type {rope['rope_type']!r} is not supported for "
                              f"Qwen3 (default, yarn)")
    scaling = yarn_from_hf(rope, config, source, "rope_parameters") if rope["rope_type"] == "yarn" else None
    return {"rope_theta": float(rope.get("rope_theta", 1000000.0)), "rope_scaling": scaling}


def qwen3_attention_from_hf(config: dict[str, Any], source: str) -> dict[str, Any]:
    """Checks a Qwen3 config.json uses full attention everywhere; its norm eps and RoPE."""
    if config.get("use_sliding_window"):
        raise CheckpointError(f"HF checkpoint {source}: use_sliding_window is true; only full attention is "
                              f"supported for Qwen3")
    bad = sorted({t for t in config.get("layer_types") or [] if t != "full_attention"})
    if bad:
        raise CheckpointError(f"HF checkpoint {source}: layer_types has {bad}; only full_attention is supported "
                              f"for Qwen3")
    return {"norm_eps": float(config.get("rms_norm_eps", 1e-6)), **qwen3_rope_from_hf(config, source)}


class Qwen3StateDictAdapter(StateDictAdapter):
    hf_model_type = "qwen3"
    hf_architecture = "Qwen3ForCausalLM"
    to_hf_table = QWEN3_TABLE
    args_cls: type[DecoderArgs] = Qwen3ModelArgs

    def expert_problems(self) -> list[str]:
        """What about the experts the HF class cannot say (the dense class: any)."""
        return [] if self.args.moe is None else ["moe is set (a mixture of experts is qwen3_moe's)"]

    def cannot_express(self) -> list[str]:
        return self.expert_problems() + qwen3_cannot_express(self.args)

    def family_hf_config(self, dtype: str) -> dict[str, Any]:
        a = self.args
        rope, scaling = hf_rope_fields(a.rope_theta, a.rope_scaling)
        return {
            "head_dim": a.attn_head_dim, "rms_norm_eps": a.norm_eps, "rope_scaling": scaling,
            "rope_parameters": rope, "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": a.n_layers, "layer_types": ["full_attention"] * a.n_layers,
            "attention_dropout": 0.0, "initializer_range": a.init_std, "use_cache": True, "dtype": dtype,
            # Ids outside the vocabulary (a debug model with a small tokenizer) would break transformers.
            **{k: (v if v < a.vocab_size else None) for k, v in TOKEN_IDS.items()},
        }

    @classmethod
    def args_from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> DecoderArgs:
        common = cls.common_args_from_hf(config, source)
        # Qwen3Config's head_dim default is 128, not hidden_size / heads: a file without one means 128.
        if "head_dim" not in config:
            common["head_dim"] = 128
        common.setdefault("head_dim", common["dim"] // common["n_heads"])
        return cls.args_cls(**common, ffn_hidden_dim=int(config["intermediate_size"]),
                            **qwen3_attention_from_hf(config, source))
