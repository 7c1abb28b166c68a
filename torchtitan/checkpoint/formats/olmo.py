"""Import OLMo's own unsharded checkpoints (allenai/OLMo trainer: config.yaml + model.safetensors or model.pt).

Weights come fused: `att_proj` is q|k|v stacked on the output dim, and
`ff_proj` is the SwiGLU input projection with the *up* half first and the
*gate* half second (OLMo's SwiGLU computes `x, gate = chunk(2); silu(gate) * x`).
Everything else is a rename from `transformer.*`. The model args, the RoPE theta
included, come from config.yaml's `model` section; a key absent there takes
OLMo's own default for it (e.g. rope_theta 10000), never a guess of ours.

OLMo's model.safetensors stores every key as a base64-encoded *pickle* of the
key tuple (olmo/safetensors_util.py). Decoding a key therefore unpickles data
from the file, which can execute code when the file is malicious, so it is
refused unless the caller opts in with trust_pickled_keys. Even then keys are
unpickled with an Unpickler that rejects every global, which is all a tuple of
strings and a bool needs; tensors stored as pickled values are skipped.
model.pt is read with torch.load(weights_only=True), and a model.safetensors whose
names are already plain `transformer.*` strings is read as is.
"""
from __future__ import annotations

import base64
import io
import logging
import os
import pickle
from dataclasses import dataclass
from typing import Any

import torch

from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.olmo.args import OlmoModelArgs
from torchtitan.models.olmo2.args import Olmo2ModelArgs
from torchtitan.tools.errors import CheckpointError

logger = logging.getLogger(__name__)

# OLMo ModelConfig defaults for keys a config.yaml may omit (olmo/config.py).
_OLMO_DEFAULTS = {"rope_theta": 10000.0, "layer_norm_eps": 1e-5, "clip_qkv": None, "n_kv_heads": None,
                  "weight_tying": True, "mlp_ratio": 4, "mlp_hidden_size": None, "embedding_size": 50304,
                  "multi_query_attention": False, "max_sequence_length": 1024, "attention_layer_norm": False,
                  "norm_after": False, "layer_norm_type": "default", "layer_norm_with_affine": True,
                  "attention_layer_norm_with_affine": True, "include_bias": True, "bias_for_layer_norm": None,
                  "activation_type": "swiglu", "block_type": "sequential", "rope": False, "alibi": False,
                  "scale_logits": False, "embedding_layer_norm": False, "rope_full_precision": True,
                  "attention_dropout": 0.1, "residual_dropout": 0.1, "embedding_dropout": 0.1}
# OLMo options that change the forward pass (or, dropout, training) and that our decoder does not implement,
# with the value it computes as. Importing a model that sets another value would silently change it.
_IMPLEMENTED_AS = {"scale_logits": False, "embedding_layer_norm": False, "rope_full_precision": True,
                   "attention_dropout": 0.0, "residual_dropout": 0.0, "embedding_dropout": 0.0}


@dataclass
class OlmoCheckpoint:
    family: str  # "olmo" or "olmo2": the model.name to train it with
    args: DecoderArgs  # OlmoModelArgs or Olmo2ModelArgs
    state_dict: dict[str, torch.Tensor]  # native names


def read_model_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.yaml (an unsharded OLMo checkpoint folder has config.yaml "
                              f"and model.safetensors or model.pt)")
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f)
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: no `model:` section")
    return model


def _get(model: dict[str, Any], key: str) -> Any:
    value = model.get(key, _OLMO_DEFAULTS.get(key))
    if key not in model and key in ("rope_theta", "layer_norm_eps"):
        logger.info("config.yaml has no model.%s: using OLMo's default %s", key, value)
    return value


def family_of(model: dict[str, Any]) -> str:
    """olmo (non-parametric LayerNorm, pre-norm) or olmo2 (RMSNorm after, QK-norm); anything else is refused."""
    g = lambda k: _get(model, k)  # noqa: E731
    unsupported = [f"{k}={g(k)!r}" for k, ok in (("activation_type", "swiglu"), ("block_type", "sequential"))
                   if g(k) != ok]
    unsupported += [f"{k}=true" for k in ("include_bias", "alibi") if g(k)]
    if not g("rope"):
        unsupported.append("rope=false")
    if g("bias_for_layer_norm"):
        unsupported.append("bias_for_layer_norm=true")
    if unsupported:
        raise CheckpointError(f"config.yaml: unsupported OLMo architecture ({', '.join(unsupported)}); "
                              f"only SwiGLU, sequential blocks, RoPE and no biases are supported")
    different = [f"{k}={g(k)!r}" for k, ours in _IMPLEMENTED_AS.items() if g(k) != ours]
    if different:
        raise CheckpointError(f"config.yaml: OLMo options this model does not implement: {', '.join(different)} "
                              f"(it computes as {', '.join(f'{k}={v!r}' for k, v in _IMPLEMENTED_AS.items())}); "
                              f"importing would change what the model computes or how it trains")
    olmo1 = (g("layer_norm_type") in ("default", "low_precision") and not g("layer_norm_with_affine")
             and not g("attention_layer_norm") and not g("norm_after"))
    olmo2 = (g("layer_norm_type") == "rms" and g("layer_norm_with_affine") and g("attention_layer_norm")
             and g("attention_layer_norm_with_affine") and g("norm_after"))
    if olmo1:
        return "olmo"
    if olmo2:
        return "olmo2"
    keys = ("layer_norm_type", "layer_norm_with_affine", "attention_layer_norm", "norm_after")
    raise CheckpointError("config.yaml: norm settings " + ", ".join(f"{k}={g(k)!r}" for k in keys) +
                          " are neither OLMo 1 (default, no affine, no QK-norm, pre-norm) nor OLMo 2 "
                          "(rms, affine, QK-norm, norm_after)")


def model_args_from_config(model: dict[str, Any]):
    """(family, model args) from config.yaml's model section."""
    family = family_of(model)
    d, heads = _get(model, "d_model"), _get(model, "n_heads")
    kv = 1 if _get(model, "multi_query_attention") else _get(model, "n_kv_heads")
    fused_hidden = _get(model, "mlp_hidden_size") or _get(model, "mlp_ratio") * d
    common = dict(dim=d, n_layers=_get(model, "n_layers"), n_heads=heads,
                  n_kv_heads=None if kv in (None, heads) else kv,
                  ffn_hidden_dim=fused_hidden // 2,
                  vocab_size=_get(model, "embedding_size") or _get(model, "vocab_size"),
                  rope_theta=float(_get(model, "rope_theta")), max_seq_len=_get(model, "max_sequence_length"),
                  tie_word_embeddings=bool(_get(model, "weight_tying")), norm_eps=float(_get(model, "layer_norm_eps")))
    if family == "olmo":
        return family, OlmoModelArgs(**common, clip_qkv=_get(model, "clip_qkv"))
    if _get(model, "clip_qkv") is not None:
        raise CheckpointError("config.yaml: clip_qkv with OLMo 2 norms is not supported")
    return family, Olmo2ModelArgs(**common)


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"OLMo safetensors key refers to {module}.{name}; a key is a tuple of "
                                     f"strings and a bool, so this file is not a plain OLMo checkpoint")


def decode_key(key: str) -> tuple[tuple, bool]:
    """OLMo's encode_key inverse: base64 of pickle((key_tuple, value_is_pickled))."""
    keys, value_is_pickled = _NoGlobalsUnpickler(io.BytesIO(base64.urlsafe_b64decode(key))).load()
    return tuple(keys), bool(value_is_pickled)


def read_olmo_weights(folder: str, trust_pickled_keys: bool = False) -> dict[str, torch.Tensor]:
    """OLMo-named tensors (transformer.*) from model.safetensors (encoded keys) or model.pt."""
    st, pt = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.pt")
    if os.path.isfile(st):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(st, "pt") as f:
            names = list(f.keys())
        if all(n.startswith(("transformer.", "model.transformer.")) for n in names):
            return load_file(st)  # plain tensor names (re-saved checkpoints): nothing to decode
        if not trust_pickled_keys:
            raise CheckpointError(
                f"{st} stores its tensor names as base64-encoded pickles (OLMo's safetensors format); decoding them "
                f"unpickles data from the file, which can run code if the file is malicious. Pass "
                f"--trust-pickled-keys (trust_pickled_keys=True) if you trust where this checkpoint came from")
        out = {}
        for key, value in load_file(st).items():
            keys, value_is_pickled = decode_key(key)
            if value_is_pickled:
                logger.warning("%s: skipping non-tensor entry %s", st, ".".join(map(str, keys)))
                continue
            out[".".join(map(str, keys))] = value
        return out
    if os.path.isfile(pt):
        sd = torch.load(pt, map_location="cpu", weights_only=True)
        return sd.get("model", sd) if isinstance(sd, dict) else sd
    raise CheckpointError(f"{folder}: neither model.safetensors nor model.pt (sharded OLMo checkpoints must be "
                              f"unsharded first with OLMo's scripts/unshard.py)")


def olmo_to_native(weights: dict[str, torch.Tensor], family: str, args) -> dict[str, torch.Tensor]:
    """Split the fused projections and rename `transformer.*` to our names."""
    if weights and all(k.startswith("model.") for k in weights):
        weights = {k[len("model."):]: v for k, v in weights.items()}
    w = dict(weights)

    def take(key: str) -> torch.Tensor:
        if key not in w:
            raise CheckpointError(f"OLMo checkpoint has no {key!r} (keys look like: {sorted(weights)[:4]})")
        return w.pop(key)

    q_dim, kv_dim = args.n_heads * args.attn_head_dim, args.kv_heads * args.attn_head_dim
    out = {"tok_embeddings.weight": take("transformer.wte.weight")}
    for i in range(args.n_layers):
        b, n = f"transformer.blocks.{i}.", f"layers.{i}."
        q, k, v = take(b + "att_proj.weight").split([q_dim, kv_dim, kv_dim], dim=0)
        up, gate = take(b + "ff_proj.weight").chunk(2, dim=0)
        out.update({n + "attention.wq.weight": q, n + "attention.wk.weight": k, n + "attention.wv.weight": v,
                    n + "attention.wo.weight": take(b + "attn_out.weight"),
                    n + "feed_forward.w1.weight": gate, n + "feed_forward.w3.weight": up,
                    n + "feed_forward.w2.weight": take(b + "ff_out.weight")})
        if family == "olmo2":
            out.update({n + "attention.q_norm.weight": take(b + "q_norm.weight"),
                        n + "attention.k_norm.weight": take(b + "k_norm.weight"),
                        n + "post_attention_norm.weight": take(b + "attn_norm.weight"),
                        n + "post_ffn_norm.weight": take(b + "ff_norm.weight")})
    if family == "olmo2":
        out["norm.weight"] = take("transformer.ln_f.weight")
    if args.tie_word_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
        w.pop("transformer.ff_out.weight", None)
    else:
        out["output.weight"] = take("transformer.ff_out.weight")
    leftover = sorted(k for k in w if not k.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise CheckpointError(f"OLMo checkpoint has tensors this import does not map: {leftover[:6]}"
                                  f"{' ...' if len(leftover) > 6 else ''}")
    return {k: v.contiguous() for k, v in out.items()}


def load_olmo_checkpoint(folder: str, trust_pickled_keys: bool = False) -> OlmoCheckpoint:
    family, args = model_args_from_config(read_model_config(folder))
    weights = read_olmo_weights(folder, trust_pickled_keys)
    return OlmoCheckpoint(family, args, olmo_to_native(weights, family, args))
