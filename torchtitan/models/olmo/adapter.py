"""OLMo 1 native <-> transformers' OlmoForCausalLM: names and config.json.

RoPE is rotate-half in both, so q/k need no permutation; the only non-rename is
weight tying (models/common/adapter.py). OLMo 2's adapter extends this one.
"""
from __future__ import annotations

from typing import Any

from torchtitan.models.common.adapter import HF_DECODER_TABLE, StateDictAdapter, hf_rope_params
from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.olmo.args import OlmoModelArgs
from torchtitan.tools.errors import CheckpointError


class OlmoStateDictAdapter(StateDictAdapter):
    hf_model_type = "olmo"
    hf_architecture = "OlmoForCausalLM"
    to_hf_table = HF_DECODER_TABLE  # OLMo 1's norms have no weights
    args_cls: type[DecoderArgs] = OlmoModelArgs
    # GPT-NeoX-20B (OLMo) tokenizer ids.
    token_ids = {"pad_token_id": 1, "eos_token_id": 50279, "bos_token_id": None}

    def family_hf_config(self, dtype: str) -> dict[str, Any]:
        a = self.args
        return {
            "rope_scaling": None,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            # Ids outside the vocabulary (a debug model with a small tokenizer) would break transformers.
            **{k: (v if v is not None and v < a.vocab_size else None) for k, v in self.token_ids.items()},
            **self.norm_hf_config(),
        }

    def norm_hf_config(self) -> dict[str, Any]:
        return {"clip_qkv": self.args.clip_qkv}

    @classmethod
    def family_args_from_hf(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {"clip_qkv": config.get("clip_qkv")}

    @classmethod
    def args_from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> DecoderArgs:
        common = cls.common_args_from_hf(config, source)
        rope = hf_rope_params(config)
        if rope["rope_type"] != "default":
            raise CheckpointError(f"HF checkpoint {source}: rope type {rope['rope_type']!r} is not supported for "
                                  f"OLMo (only plain RoPE)")
        if rope.get("rope_theta") is None:
            raise CheckpointError(f"HF checkpoint {source}: config.json has neither rope_theta nor "
                                  f"rope_parameters.rope_theta")
        return cls.args_cls(**common, ffn_hidden_dim=int(config["intermediate_size"]),
                            rope_theta=float(rope["rope_theta"]), **cls.family_args_from_hf(config))
