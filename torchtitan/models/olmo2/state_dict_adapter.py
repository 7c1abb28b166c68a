"""OLMo 2 native <-> transformers `Olmo2ForCausalLM` names and config.json (same API as OLMo 1's adapter)."""
from __future__ import annotations

from typing import Any

from torchtitan.models.olmo.state_dict_adapter import OlmoStateDictAdapter, _SHARED_TABLE, check_hf_config
from torchtitan.models.olmo2.model import Olmo2ModelArgs


class Olmo2StateDictAdapter(OlmoStateDictAdapter):
    to_hf_table = {
        **_SHARED_TABLE,
        "layers.{}.attention.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
        "layers.{}.attention.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
        "layers.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
        "layers.{}.post_ffn_norm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
        "norm.weight": "model.norm.weight",
    }
    model_type = "olmo2"
    architecture = "Olmo2ForCausalLM"
    # dolma2 (cl100k-based) tokenizer ids, as in allenai/OLMo-2-1124-7B's config.json.
    token_ids = {"pad_token_id": 100277, "eos_token_id": 100257, "bos_token_id": 100257}

    def _family_config(self) -> dict[str, Any]:
        return {"rms_norm_eps": self.args.norm_eps}

    @classmethod
    def args_from_hf_config(cls, config: dict[str, Any]) -> Olmo2ModelArgs:
        check_hf_config(config, cls.model_type)
        return Olmo2ModelArgs(**cls._common_args(config), norm_eps=float(config.get("rms_norm_eps", 1e-6)))
