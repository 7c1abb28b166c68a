"""OLMo 2 native <-> transformers' Olmo2ForCausalLM: OLMo's mapping plus the QK-norm and post-norm weights."""
from __future__ import annotations

from typing import Any

from torchtitan.models.common.adapter import HF_DECODER_TABLE
from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.olmo.adapter import OlmoStateDictAdapter
from torchtitan.models.olmo2.args import Olmo2ModelArgs


class Olmo2StateDictAdapter(OlmoStateDictAdapter):
    hf_model_type = "olmo2"
    hf_architecture = "Olmo2ForCausalLM"
    to_hf_table = {
        **HF_DECODER_TABLE,
        "layers.{}.attention.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
        "layers.{}.attention.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
        "layers.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
        "layers.{}.post_ffn_norm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
        "norm.weight": "model.norm.weight",
    }
    args_cls: type[DecoderArgs] = Olmo2ModelArgs
    # dolma2 (cl100k-based) tokenizer ids, as in allenai/OLMo-2-1124-7B's config.json.
    token_ids = {"pad_token_id": 100277, "eos_token_id": 100257, "bos_token_id": 100257}

    def norm_hf_config(self) -> dict[str, Any]:
        return {"rms_norm_eps": self.args.norm_eps}

    @classmethod
    def family_args_from_hf(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {"norm_eps": float(config.get("rms_norm_eps", 1e-6))}
