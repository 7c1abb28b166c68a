"""OLMo 3 native <-> transformers' Olmo3ForCausalLM: OLMo 2's names, plus which layers slide and their RoPE.

config.json describes the attention of every layer (`layer_types`, one "sliding_attention" or
"full_attention" per layer, and `sliding_window`); ours stores the shortest repeating pattern. Olmo3Config
also gives each layer type its own RoPE: a legacy `rope_scaling` (and a flat `rope_parameters`) applies to
the full-attention layers only, while the sliding layers keep plain RoPE. Our args say the same with
rope_scaling plus rope_scaling_layers ("full": the released 65K-context models, YaRN on the full-attention
layers; "all": one scaling on every layer). An import accepts plain RoPE and YaRN with one theta for every
layer type in use and refuses the rest by name (other rope types, a scaling on the sliding layers only,
different scalings per layer type).
"""
from __future__ import annotations

from typing import Any

from torchtitan.models.common.adapter import hf_rope_params, hf_rope_scaling, yarn_from_hf
from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.rope import YarnScaling
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


def hf_layer_type_scaling(rope: dict[str, Any], config: dict[str, Any], t: str, source: str,
                          in_use: bool = True) -> YarnScaling | None:
    """Our scaling for the RoPE of HF layer type `t` (None: plain RoPE), or a CheckpointError naming it. A type
    no layer has (in_use False) may carry anything, transformers never computes it: None when we cannot say it."""
    p, where = rope[t], f"rope_scaling / rope_parameters.{t}"
    try:
        if p["rope_type"] == "default":
            return None
        if p["rope_type"] != "yarn":
            raise CheckpointError(f"HF checkpoint {source}: rope type {p['rope_type']!r} on the {t} layers ({where}) "
                                  f"is not supported; OLMo 3 imports plain RoPE ('default') and 'yarn'")
        scaling = yarn_from_hf(p, config, source, where)
        if not scaling.truncate:
            # 4.x honoured it; 5.x (checked on 5.24) reads `truncate` from the top level of rope_parameters,
            # which Olmo3Config keys by layer type, so it always truncates: the two disagree on the file.
            raise CheckpointError(f"HF checkpoint {source}: {where} sets truncate: false, which transformers 5.x "
                                  f"ignores for Olmo3 (and 4.x applies); remove it or set it to true")
        return scaling
    except CheckpointError:
        if in_use:
            raise
        return None


class Olmo3StateDictAdapter(Olmo2StateDictAdapter):
    hf_model_type = "olmo3"
    hf_architecture = "Olmo3ForCausalLM"
    args_cls: type[DecoderArgs] = Olmo3ModelArgs
    # dolma2 tokenizer ids, as in allenai/Olmo-3-1025-7B's config.json (which sets no BOS).
    token_ids = {"pad_token_id": 100277, "eos_token_id": 100257, "bos_token_id": None}

    def family_hf_config(self, dtype: str) -> dict[str, Any]:
        a = self.args
        if a.rope_scaling is not None and not isinstance(a.rope_scaling, YarnScaling):
            raise CheckpointError(f"model args rope_scaling is {a.rope_scaling.kind!r}; the OLMo 3 export writes "
                                  f"plain RoPE or yarn")
        if a.rope_scaling is not None and not a.rope_scaling.truncate:
            raise CheckpointError("model args rope_scaling.truncate = False cannot be exported: transformers 5.x "
                                  "ignores truncate in Olmo3's per-layer-type rope_parameters")
        plain = {"rope_type": "default", "rope_theta": a.rope_theta}
        scaling = hf_rope_scaling(a.rope_scaling) if a.rope_scaling is not None else None
        scaled = {**scaling, "rope_theta": a.rope_theta} if scaling is not None else plain
        return {
            **super().family_hf_config(dtype),
            "layer_types": [TO_HF_LAYER_TYPE[a.layer_attention(i)] for i in range(a.n_layers)],
            # transformers builds the sliding mask even when no layer uses it and fails without a window;
            # with no sliding layer the value is never applied.
            "sliding_window": a.sliding_window if a.sliding_window is not None else a.max_seq_len,
            # transformers 5.x keys RoPE by layer type; 4.x reads the top-level rope_theta (written too) and
            # applies rope_scaling to the full-attention layers only, which is all it can say.
            "rope_parameters": {"full_attention": scaled,
                                "sliding_attention": scaled if a.rope_scaling_layers == "all" else dict(plain)},
            "rope_scaling": scaling,
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
        thetas = {t: float(rope[t]["rope_theta"]) for t in used}
        if len(set(thetas.values())) > 1:
            raise CheckpointError(f"HF checkpoint {source}: rope_parameters give the layer types different "
                                  f"rope_theta ({thetas}); our decoder applies one theta to every layer")
        # The scaling of a layer type no layer has is kept too, so that an export writes the file's RoPE back.
        full, sliding = (hf_layer_type_scaling(rope, config, t, source, in_use=t in used)
                         for t in ("full_attention", "sliding_attention"))
        rope_args: dict[str, Any] = {}
        if full == sliding:
            rope_args = dict(rope_scaling=full, rope_scaling_layers="all") if full is not None else {}
        elif sliding is None:
            rope_args = dict(rope_scaling=full, rope_scaling_layers="full")
        elif "full_attention" not in used:
            rope_args = dict(rope_scaling=sliding, rope_scaling_layers="all")
        else:
            raise CheckpointError(
                f"HF checkpoint {source}: rope_parameters scale the sliding_attention layers "
                f"({rope['sliding_attention']['rope_type']!r}) unlike the full_attention ones "
                f"({rope['full_attention']['rope_type']!r}); our decoder scales every layer alike or the "
                f"full-attention layers only")
        sliding_layers = "sliding" in layers
        return cls.args_cls(**common, ffn_hidden_dim=int(config["intermediate_size"]),
                            rope_theta=thetas[used[0]], norm_eps=float(config.get("rms_norm_eps", HF_DEFAULT_EPS)),
                            sliding_window=window if sliding_layers else None,
                            attention_pattern=shortest_period(layers) if sliding_layers else ("full",), **rope_args)
