"""Gemma 3 native <-> transformers' Gemma3ForCausalLM (text, model_type "gemma3_text"): names, config.json.

The norm weights are the `w` of (1 + w) in both, so they move as they are. config.json carries RoPE both ways:
transformers 5.x's rope_parameters keyed by layer type, and 4.x's rope_theta / rope_local_base_freq /
rope_scaling (which scaled the global layers only); layer types both as layer_types and as 4.x's
sliding_window_pattern. The multimodal releases (4B and up, model_type "gemma3") hold this config as their
`text_config` and the text model's weights under `language_model.`: an import reads both and leaves the
vision tower and projector out (an export is the text model, Gemma3ForCausalLM). What Gemma3ForCausalLM
cannot say is refused by name, never exported wrong.
"""
from __future__ import annotations

from typing import Any

from torchtitan.models.common.adapter import HF_DECODER_TABLE, StateDictAdapter
from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.rope import LinearScaling
from torchtitan.models.gemma3.args import Gemma3ModelArgs
from torchtitan.tools.errors import CheckpointError

TO_HF_LAYER_TYPE = {"sliding": "sliding_attention", "full": "full_attention"}
FROM_HF_LAYER_TYPE = {v: k for k, v in TO_HF_LAYER_TYPE.items()}
# Gemma3TextConfig's values for keys a config.json (or a multimodal release's text_config) leaves out.
HF_DEFAULTS = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
               "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131072,
               "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096,
               "tie_word_embeddings": True, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
               "hidden_activation": "gelu_pytorch_tanh", "sliding_window_pattern": 6}
TOKEN_IDS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}


def gemma3_cannot_express(a: DecoderArgs) -> list[str]:
    checks = [
        (a.moe is not None, "moe is set (no experts)"),
        ((a.norm, a.block, a.qk_norm, a.feed_forward, a.rope_layout, a.attention)
         != ("rms_plus_one", "sandwich", "head", "geglu", "half", "gqa"),
         "norm/block/qk_norm/feed_forward/rope_layout/attention differ from rms_plus_one/sandwich/head/geglu/"
         "half/gqa"),
        (not a.scale_embeddings, "scale_embeddings = False (Gemma scales by sqrt(dim))"),
        (not a.tie_word_embeddings, "tie_word_embeddings = False (Gemma ties them)"),
        (a.clip_qkv is not None, f"clip_qkv = {a.clip_qkv} (no clipping)"),
        (a.rope_scaling is not None and not isinstance(a.rope_scaling, LinearScaling),
         "rope_scaling is not linear (plain or linear RoPE scaling)"),
        (a.rope_scaling is not None and a.rope_scaling_layers != "full",
         "rope_scaling_layers = 'all' (the scaling applies to the global layers only)"),
        (a.rope_local_theta is None and a.sliding_window is not None,
         "rope_local_theta is None (the sliding layers have their own theta)"),
    ]
    return [msg for bad, msg in checks if bad]


class Gemma3StateDictAdapter(StateDictAdapter):
    hf_model_type = "gemma3_text"
    hf_architecture = "Gemma3ForCausalLM"
    to_hf_table = {
        **{k: v for k, v in HF_DECODER_TABLE.items() if k != "output.weight"},
        "layers.{}.attention.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
        "layers.{}.attention.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
        "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
        "layers.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
        "layers.{}.ffn_norm.weight": "model.layers.{}.pre_feedforward_layernorm.weight",
        "layers.{}.post_ffn_norm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    args_cls: type[DecoderArgs] = Gemma3ModelArgs
    # The multimodal releases (4B and up): their text model, under language_model., without the vision tower.
    also_reads_model_types = ("gemma3",)
    skipped_hf_prefixes = ("vision_tower.", "multi_modal_projector.")

    def native_key(self, hf_key: str) -> str | None:
        return super().native_key(hf_key.removeprefix("language_model."))

    def cannot_express(self) -> list[str]:
        return gemma3_cannot_express(self.args)

    def family_hf_config(self, dtype: str) -> dict[str, Any]:
        a = self.args
        layers = [TO_HF_LAYER_TYPE[a.layer_attention(i)] for i in range(a.n_layers)]
        scaling = {"rope_type": "linear", "factor": a.rope_scaling.factor} if a.rope_scaling is not None else None
        local = a.rope_local_theta if a.rope_local_theta is not None else a.rope_theta
        full = {**(scaling or {"rope_type": "default"}), "rope_theta": a.rope_theta}
        out = {
            "hidden_activation": "gelu_pytorch_tanh", "head_dim": a.attn_head_dim, "rms_norm_eps": a.norm_eps,
            "query_pre_attn_scalar": a.query_pre_attn_scalar if a.query_pre_attn_scalar is not None
            else a.attn_head_dim,
            "sliding_window": a.sliding_window if a.sliding_window is not None else a.max_seq_len,
            "layer_types": layers, "rope_scaling": scaling, "rope_local_base_freq": local,
            "rope_parameters": {"full_attention": full, "sliding_attention": {"rope_type": "default",
                                                                              "rope_theta": local}},
            "final_logit_softcapping": None, "attn_logit_softcapping": None, "use_bidirectional_attention": False,
            "attention_dropout": 0.0, "initializer_range": a.init_std, "use_cache": True,
            "cache_implementation": "hybrid", "dtype": dtype,
            # Ids outside the vocabulary (a debug model with a small tokenizer) would break transformers.
            **{k: (v if v < a.vocab_size else None) for k, v in TOKEN_IDS.items()},
        }
        period = tuple(a.layer_attention(i) for i in range(min(6, a.n_layers)))
        if a.n_layers >= 6 and period == ("sliding",) * 5 + ("full",) and all(
                a.layer_attention(i) == period[i % 6] for i in range(a.n_layers)):
            out["sliding_window_pattern"] = 6  # what transformers 4.x reads
        return out

    @classmethod
    def args_from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> DecoderArgs:
        if config.get("model_type") == "gemma3":  # a multimodal release: its text model's config
            config = {**config.get("text_config", {}), "model_type": "gemma3_text"}
        config = {**HF_DEFAULTS, **{k: v for k, v in config.items() if v is not None or k.endswith("capping")}}
        common = cls.common_args_from_hf(config, source)
        common.setdefault("head_dim", common["dim"] // common["n_heads"])
        common["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", True))
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if config.get(key) is not None:
                raise CheckpointError(f"HF checkpoint {source}: {key} {config[key]} is not supported (Gemma 3 "
                                      f"has none)")
        if config.get("use_bidirectional_attention"):
            raise CheckpointError(f"HF checkpoint {source}: use_bidirectional_attention is true; only causal "
                                  f"attention is supported")
        if config["hidden_activation"] not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise CheckpointError(f"HF checkpoint {source}: hidden_activation {config['hidden_activation']!r}: "
                                  f"only gelu_pytorch_tanh (GeGLU) is supported")
        layers = _layer_types(config, common["n_layers"], source)
        period = next(p for p in range(1, len(layers) + 1)
                      if all(layers[i] == layers[i % p] for i in range(len(layers))))
        return cls.args_cls(**common, ffn_hidden_dim=int(config["intermediate_size"]),
                            norm_eps=float(config["rms_norm_eps"]),
                            query_pre_attn_scalar=int(config["query_pre_attn_scalar"]),
                            sliding_window=int(config["sliding_window"]) if "sliding" in layers else None,
                            attention_pattern=tuple(layers[:period]), **_rope_from_hf(config, source))


def _layer_types(config: dict[str, Any], n_layers: int, source: str) -> list[str]:
    types = config.get("layer_types")
    if types is None:
        p = int(config["sliding_window_pattern"])
        return ["sliding" if (i + 1) % p else "full" for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers or any(t not in FROM_HF_LAYER_TYPE for t in types):
        raise CheckpointError(f"HF checkpoint {source}: layer_types must list sliding_attention / full_attention "
                              f"once per layer ({n_layers})")
    return [FROM_HF_LAYER_TYPE[t] for t in types]


def _rope_from_hf(config: dict[str, Any], source: str) -> dict[str, Any]:
    """rope_theta, rope_local_theta and the global layers' scaling, from 5.x rope_parameters or 4.x keys."""
    params = config.get("rope_parameters") or {}
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
    if not full:
        full = {**(config.get("rope_scaling") or {"rope_type": "default"}), "rope_theta": config["rope_theta"]}
    full.setdefault("rope_theta", config["rope_theta"])
    local.setdefault("rope_type", "default")
    local.setdefault("rope_theta", config["rope_local_base_freq"])
    kind = full.get("rope_type", full.get("type", "default"))
    if local["rope_type"] != "default" or kind not in ("default", "linear"):
        raise CheckpointError(f"HF checkpoint {source}: rope parameters {params or config.get('rope_scaling')} are "
                              f"not supported for Gemma 3 (plain RoPE locally, plain or linear globally)")
    scaling = LinearScaling(factor=float(full["factor"])) if kind == "linear" else None
    return {"rope_theta": float(full["rope_theta"]), "rope_local_theta": float(local["rope_theta"]),
            "rope_scaling": scaling}
