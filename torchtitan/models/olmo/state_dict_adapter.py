"""OLMo 1 native <-> transformers `OlmoForCausalLM` names, plus the HF config.json both ways.

RoPE is rotate-half in both, so q/k need no permutation; the only non-rename is
weight tying: a tied model's HF checkpoint has no `lm_head.weight`.

API shared with olmo2 (and meant for any converter):
- ``to_hf(native_sd)`` / ``from_hf(hf_sd)``: tensors by name.
- ``hf_config(dtype="float32", **overrides)``: the config.json dict transformers loads.
- ``args_from_hf_config(config_dict)`` (classmethod): model args from a config.json.
"""
from __future__ import annotations

from typing import Any

import torch

from torchtitan.models.common.state_dict_adapter import TableAdapter
from torchtitan.models.olmo.model import OlmoModelArgs

_SHARED_TABLE = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "output.weight": "lm_head.weight",
}


def rope_theta_of(config: dict[str, Any]) -> float:
    """transformers <5 writes `rope_theta`; 5.x nests it in `rope_parameters`."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(f"HF config: rope type {kind!r} is not supported for OLMo (only plain RoPE)")
    theta = params.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise ValueError("HF config has neither rope_theta nor rope_parameters.rope_theta")
    return float(theta)


def check_hf_config(config: dict[str, Any], model_type: str) -> None:
    if config.get("model_type") != model_type:
        raise ValueError(f"HF config model_type is {config.get('model_type')!r}, expected {model_type!r}")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"HF config hidden_act {config['hidden_act']!r}: only silu (SwiGLU) is supported")
    if config.get("attention_bias"):
        raise ValueError("HF config attention_bias = true: OLMo models here have no biases")


class OlmoStateDictAdapter(TableAdapter):
    to_hf_table = dict(_SHARED_TABLE)
    model_type = "olmo"
    architecture = "OlmoForCausalLM"
    # GPT-NeoX-20B (OLMo) tokenizer ids; override through hf_config(**overrides) for other tokenizers.
    token_ids = {"pad_token_id": 1, "eos_token_id": 50279, "bos_token_id": None}

    def to_hf(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.args.tie_word_embeddings:
            state_dict = {k: v for k, v in state_dict.items() if k != "output.weight"}
        return super().to_hf(state_dict)

    def from_hf(self, hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.args.tie_word_embeddings:
            # Some exporters write lm_head.weight for tied models too; the embedding is the one weight.
            hf_state_dict = {k: v for k, v in hf_state_dict.items() if k != "lm_head.weight"}
        out = super().from_hf(hf_state_dict)
        if self.args.tie_word_embeddings and "tok_embeddings.weight" in out:
            out["output.weight"] = out["tok_embeddings.weight"]
        return out

    def hf_config(self, dtype: str | torch.dtype = "float32", **overrides: Any) -> dict[str, Any]:
        """config.json for transformers; dtype names the weights' dtype (string or torch.dtype)."""
        a = self.args
        dtype = str(dtype).removeprefix("torch.")
        cfg = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": a.vocab_size,
            "hidden_size": a.dim,
            "intermediate_size": a.ffn_hidden_dim,
            "num_hidden_layers": a.n_layers,
            "num_attention_heads": a.n_heads,
            "num_key_value_heads": a.kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": a.max_seq_len,
            # Top-level rope_theta is what transformers 4.x reads; 5.x converts it to rope_parameters.
            "rope_theta": a.rope_theta,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": a.tie_word_embeddings,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": dtype,  # transformers 4.x name; 5.x reads it as `dtype`
            # Ids outside the vocabulary (a debug model with a small tokenizer) would break transformers.
            **{k: (v if v is not None and v < a.vocab_size else None) for k, v in self.token_ids.items()},
            **self._family_config(),
        }
        cfg.update(overrides)
        return cfg

    def _family_config(self) -> dict[str, Any]:
        return {"clip_qkv": self.args.clip_qkv}

    @classmethod
    def args_from_hf_config(cls, config: dict[str, Any]) -> OlmoModelArgs:
        check_hf_config(config, cls.model_type)
        return OlmoModelArgs(**cls._common_args(config), clip_qkv=config.get("clip_qkv"))

    @staticmethod
    def _common_args(config: dict[str, Any]) -> dict[str, Any]:
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads") or heads
        return dict(dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=heads,
                    n_kv_heads=None if kv == heads else kv, ffn_hidden_dim=config["intermediate_size"],
                    vocab_size=config["vocab_size"], rope_theta=rope_theta_of(config),
                    max_seq_len=config.get("max_position_embeddings", 2048),
                    tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "OlmoStateDictAdapter":
        return cls(cls.args_from_hf_config(config))

