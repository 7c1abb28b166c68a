"""OLMo 3 native <-> transformers' Olmo3ForCausalLM: OLMo 2's names, plus which layers slide and their RoPE.

config.json describes the attention of every layer (`layer_types`, one "sliding_attention" or
"full_attention" per layer, and `sliding_window`); ours stores the shortest repeating pattern. Olmo3Config
also gives each layer type its own RoPE: a legacy `rope_scaling` (and a flat `rope_parameters`) applies to
the full-attention layers only, while the sliding layers keep plain RoPE. Our decoder has one RoPE table for
every layer, so an import accepts plain RoPE with one theta for every layer type in use and refuses the rest
by name: the released 65K-context OLMo 3 models (YaRN on the full-attention layers) among them.
"""
from __future__ import annotations

from typing import Any

from torchtitan.models.common.adapter import hf_rope_params
from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.olmo2.adapter import Olmo2StateDictAdapter
from torchtitan.models.olmo3.args import Olmo3ModelArgs
from torchtitan.tools.errors import CheckpointError

# Our attention_pattern entries <-> transformers' layer_types entries.
TO_HF_LAYER_TYPE = {"sliding": "sliding_attention", "full": "full_attention"}
FROM_HF_LAYER_TYPE = {v: k for k, v in TO_HF_LAYER_TYPE.items()}
# What Olmo3Config assumes for keys a config.json leaves out.
HF_DEFAULT_WINDOW = 4096
HF_DEFAULT_THETA = 500000.0
HF_DEFAULT_EPS = 1e-5


def shortest_period(items: list[str]) -> tuple[str, ...]:
    """The shortest prefix that, repeated, reproduces `items` (the list itself if nothing shorter does)."""
    for p in range(1, len(items) + 1):
        if all(items[i] == items[i % p] for i in range(len(items))):
            return tuple(items[:p])
    return tuple(items)


def hf_layer_types(config: dict[str, Any], n_layers: int, source: str) -> list[str]:
    """Our "sliding"/"full" per layer from config.json's layer_types (Olmo3Config's default when absent:
    every fourth layer full)."""
    layer_types = config.get("layer_types")
    if layer_types is None:
        return ["full" if (i + 1) % 4 == 0 else "sliding" for i in range(n_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != n_layers:
        raise CheckpointError(f"HF checkpoint {source}: layer_types must be a list of one entry per layer "
                              f"({n_layers}), got {layer_types!r}")
    bad = sorted({str(t) for t in layer_types if t not in FROM_HF_LAYER_TYPE})
    if bad:
        raise CheckpointError(f"HF checkpoint {source}: layer_types has {', '.join(map(repr, bad))}; only "
                              f"{' and '.join(map(repr, FROM_HF_LAYER_TYPE))} are supported")
    return [FROM_HF_LAYER_TYPE[t] for t in layer_types]


def hf_rope_per_layer_type(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """RoPE settings of each HF layer type, as Olmo3ForCausalLM applies them: rope_parameters keyed by layer
    type (transformers 5.x); else top-level rope_theta/rope_scaling or a flat rope_parameters (4.x, early 5.x)
    describe the full-attention layers, and the sliding layers use plain RoPE with the same theta. A
    rope_scaling next to keyed rope_parameters updates the full-attention entry, as Olmo3Config does.

    One deliberate difference: transformers 5.x (checked on 5.24) reads a legacy top-level rope_theta into the
    full-attention layers only and gives the sliding ones its default 500,000; we give both the file's theta,
    as transformers 4.x, which wrote such files, does. The two agree for every released OLMo 3 (theta 500,000)."""
    params = config.get("rope_parameters") or {}
    keyed = {t: dict(params[t]) for t in FROM_HF_LAYER_TYPE if isinstance(params.get(t), dict)}
    theta = config.get("rope_theta", HF_DEFAULT_THETA)
    # hf_rope_params merges the legacy rope_scaling, the flat rope_parameters and rope_theta into one set.
    flat = hf_rope_params({**config, "rope_parameters": {k: v for k, v in params.items()
                                                         if k not in FROM_HF_LAYER_TYPE}})
    flat.setdefault("rope_theta", theta)
    out = {"full_attention": keyed.get("full_attention", flat),
           "sliding_attention": keyed.get("sliding_attention", {"rope_type": "default",
                                                                "rope_theta": flat["rope_theta"]})}
    scaling = dict(config.get("rope_scaling") or {})
    if "type" in scaling:  # the pre-4.45 name of rope_type
        scaling.setdefault("rope_type", scaling["type"])
    out["full_attention"].update(scaling)
    for p in out.values():
        p["rope_type"] = p.get("rope_type") or p.get("type") or "default"
        p.setdefault("rope_theta", theta)
    return out


class Olmo3StateDictAdapter(Olmo2StateDictAdapter):
    hf_model_type = "olmo3"
    hf_architecture = "Olmo3ForCausalLM"
    args_cls: type[DecoderArgs] = Olmo3ModelArgs
    # dolma2 tokenizer ids, as in allenai/Olmo-3-1025-7B's config.json (which sets no BOS).
    token_ids = {"pad_token_id": 100277, "eos_token_id": 100257, "bos_token_id": None}

    def family_hf_config(self, dtype: str) -> dict[str, Any]:
        a = self.args
        rope = {"rope_type": "default", "rope_theta": a.rope_theta}
        return {
            **super().family_hf_config(dtype),
            "layer_types": [TO_HF_LAYER_TYPE[a.layer_attention(i)] for i in range(a.n_layers)],
            # transformers builds the sliding mask even when no layer uses it and fails without a window;
            # with no sliding layer the value is never applied.
            "sliding_window": a.sliding_window if a.sliding_window is not None else a.max_seq_len,
            # transformers 5.x keys RoPE by layer type (4.x reads the top-level rope_theta, written too).
            "rope_parameters": {t: dict(rope) for t in FROM_HF_LAYER_TYPE},
        }

    @classmethod
    def args_from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> DecoderArgs:
        common = cls.common_args_from_hf(config, source)
        layers = hf_layer_types(config, common["n_layers"], source)
        window = config.get("sliding_window", HF_DEFAULT_WINDOW)
        if "sliding" in layers and not (isinstance(window, int) and window >= 1):
            raise CheckpointError(f"HF checkpoint {source}: sliding_window {window!r} must be an integer >= 1 "
                                  f"when layer_types has sliding_attention layers")
        rope = hf_rope_per_layer_type(config)
        used = sorted({TO_HF_LAYER_TYPE[t] for t in layers})
        for t in used:
            if rope[t]["rope_type"] != "default":
                raise CheckpointError(
                    f"HF checkpoint {source}: rope type {rope[t]['rope_type']!r} on the {t} layers "
                    f"(rope_scaling / rope_parameters.{t}) is not supported: our decoder applies one plain RoPE to "
                    f"every layer, so only checkpoints with plain RoPE import (the released 65K-context OLMo 3 "
                    f"models use YaRN on their full-attention layers)")
        thetas = {t: float(rope[t]["rope_theta"]) for t in used}
        if len(set(thetas.values())) > 1:
            raise CheckpointError(f"HF checkpoint {source}: rope_parameters give the layer types different "
                                  f"rope_theta ({thetas}); our decoder applies one RoPE to every layer")
        sliding = "sliding" in layers
        return cls.args_cls(**common, ffn_hidden_dim=int(config["intermediate_size"]),
                            rope_theta=thetas[used[0]], norm_eps=float(config.get("rms_norm_eps", HF_DEFAULT_EPS)),
                            sliding_window=window if sliding else None,
                            attention_pattern=shortest_period(layers) if sliding else ("full",))
