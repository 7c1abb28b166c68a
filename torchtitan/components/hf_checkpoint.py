"""Hugging Face safetensors folders <-> our state dicts, via the model's state_dict_adapter.

Reading and writing go through DCP's HuggingFaceStorageReader/Writer
(torch.distributed.checkpoint, public since torch 2.8, so present in every
torch we support), which read tensor slices straight from safetensors files
and write `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`.
Without them (an older torch) we read and write with `safetensors` directly.

Names and the q/k rotary permutation are the adapter's job (a table plus two
transforms); this module only moves tensors and maps config.json <-> model args.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from torchtitan.components.checkpoint_io import CheckpointError, check_fits, state_shapes

logger = logging.getLogger("torchtitan")

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


# --------------------------------------------------------------------------- files
def hf_weight_files(folder: str) -> list[str]:
    """The safetensors files of an HF folder; a sharded index must name files that all exist."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"HF checkpoint {folder}: no such folder")
    present = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"HF checkpoint {folder}: unreadable {INDEX_FILE} ({e})") from None
        listed = sorted(set(weight_map.values()))
        missing = [f for f in listed if f not in present]
        if missing:
            raise CheckpointError(f"HF checkpoint {folder}: {INDEX_FILE} lists {', '.join(missing)} but the file(s) "
                                  f"are missing (an incomplete download?)")
        extra = [f for f in present if f not in listed]
        if extra:
            raise CheckpointError(f"HF checkpoint {folder}: {', '.join(extra)} not listed in {INDEX_FILE}; "
                                  f"move the extra safetensors files out of the folder")
        return [os.path.join(folder, f) for f in listed]
    if not present:
        raise CheckpointError(f"HF checkpoint {folder}: no *.safetensors files")
    return [os.path.join(folder, f) for f in present]


def _dcp_hf_storage():
    try:
        from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
    except ImportError:  # torch < 2.8
        return None, None
    return HuggingFaceStorageReader, HuggingFaceStorageWriter


def read_hf_shapes(folder: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """HF name -> (shape, dtype), from the safetensors headers only."""
    from safetensors import safe_open

    out = {}
    for path in hf_weight_files(folder):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    out[key] = (torch.Size(sl.get_shape()), _st_dtype(sl.get_dtype()))
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise CheckpointError(f"HF checkpoint {path}: unreadable safetensors file ({type(e).__name__}: {e})") from None
    return out


def _st_dtype(name: str) -> torch.dtype:
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
            "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}[name]


def read_hf_state_dict(folder: str, dtype: torch.dtype | None = None,
                       keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Full tensors of an HF folder (stored dtype unless dtype is given), read in this process only."""
    shapes = read_hf_shapes(folder)
    if keys is not None:
        shapes = {k: v for k, v in shapes.items() if k in keys}
    sd = {k: torch.empty(size, dtype=dtype or dt) for k, (size, dt) in shapes.items()}
    reader_cls, _ = _dcp_hf_storage()
    try:
        if reader_cls is not None:
            import torch.distributed.checkpoint as dcp

            dcp.load(sd, storage_reader=reader_cls(folder), no_dist=True)
        else:
            from safetensors import safe_open

            for path in hf_weight_files(folder):
                with safe_open(path, framework="pt") as f:
                    for k in f.keys():
                        if k in sd:
                            sd[k].copy_(f.get_tensor(k))
    except CheckpointError:
        raise
    except BaseException as e:  # noqa: BLE001 - DCP raises CheckpointException, a BaseException
        if isinstance(e, KeyboardInterrupt):
            raise
        from torchtitan.components.checkpoint_io import dcp_error_detail

        raise CheckpointError(f"HF checkpoint {folder}: reading the weights failed ({dcp_error_detail(e)})") from None
    return sd


def write_hf_state_dict(hf_sd: dict[str, torch.Tensor], folder: str, num_shards: int = 1) -> None:
    """model-0000i-of-0000N.safetensors + model.safetensors.index.json (what from_pretrained reads)."""
    keys = list(hf_sd)
    num_shards = max(1, min(num_shards, len(keys)))
    # Contiguous runs of keys per file, balanced by bytes, so layers stay together.
    total = sum(t.numel() * t.element_size() for t in hf_sd.values())
    mapping, acc = {}, 0
    for k in keys:
        mapping[k] = min(num_shards, 1 + acc * num_shards // max(total, 1))
        acc += hf_sd[k].numel() * hf_sd[k].element_size()
    hf_sd = {k: v.contiguous() for k, v in hf_sd.items()}
    _, writer_cls = _dcp_hf_storage()
    if writer_cls is not None:
        import torch.distributed.checkpoint as dcp

        dcp.save(hf_sd, storage_writer=writer_cls(folder, fqn_to_index_mapping=mapping), no_dist=True)
        return
    from safetensors.torch import save_file

    weight_map = {}
    for i in range(1, num_shards + 1):
        name = f"model-{i:05d}-of-{num_shards:05d}.safetensors"
        part = {k: v for k, v in hf_sd.items() if mapping[k] == i}
        save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ------------------------------------------------------------------ config.json <-> args
def read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"HF checkpoint {folder}: no {CONFIG_FILE}") from None
    except ValueError as e:
        raise CheckpointError(f"HF checkpoint {folder}: unreadable {CONFIG_FILE} ({e})") from None


def _rope_params(cfg: dict) -> dict:
    """transformers >= 5 writes rope_parameters; older versions rope_theta + rope_scaling."""
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    if "rope_theta" not in params and "rope_theta" in cfg:
        params["rope_theta"] = cfg["rope_theta"]
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def llama_args_from_hf_config(cfg: dict, folder: str = "config.json"):
    """LlamaModelArgs for an HF LlamaForCausalLM config, and the name of the flavor it equals (or None)."""
    from torchtitan.models.common.rope import RopeScaling
    from torchtitan.models.llama3 import llama3_flavors
    from torchtitan.models.llama3.model import LlamaModelArgs

    try:
        dim, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        inter = int(cfg["intermediate_size"])
        args = LlamaModelArgs(dim=dim, n_layers=int(cfg["num_hidden_layers"]), n_heads=heads,
                              n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                              vocab_size=int(cfg["vocab_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                              max_seq_len=int(cfg.get("max_position_embeddings", 8192)))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"HF checkpoint {folder}: {CONFIG_FILE} lacks a Llama field ({e})") from None
    if cfg.get("model_type", "llama") != "llama":
        raise CheckpointError(f"HF checkpoint {folder}: model_type {cfg.get('model_type')!r} is not llama")
    if cfg.get("head_dim") not in (None, dim // heads):
        raise CheckpointError(f"HF checkpoint {folder}: head_dim {cfg['head_dim']} != hidden_size / heads; "
                              f"our Llama derives head_dim from dim")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise CheckpointError(f"HF checkpoint {folder}: attention/MLP biases are not supported by our Llama")
    rope = _rope_params(cfg)
    args.rope_theta = float(rope.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") == "llama3":
        args.rope_scaling = RopeScaling(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                                        high_freq_factor=float(rope["high_freq_factor"]),
                                        original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    elif rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"HF checkpoint {folder}: rope_type {rope['rope_type']!r} is not supported (default, llama3)")
    # Our FFN width is derived (multiple_of, ffn_dim_multiplier): reuse a flavor's rule when one
    # gives this intermediate_size, else a multiplier that reproduces it exactly.
    for name, flavor in llama3_flavors.items():
        if flavor.dim == dim and flavor.ffn_hidden_dim == inter:
            args.multiple_of, args.ffn_dim_multiplier = flavor.multiple_of, flavor.ffn_dim_multiplier
            break
    else:
        args.multiple_of = 1
        base = int(2 * 4 * dim / 3)
        args.ffn_dim_multiplier = None if base == inter else (inter + 0.5) / base
    assert args.ffn_hidden_dim == inter, (args, inter)
    return args, matching_llama_flavor(args)


def matching_llama_flavor(args) -> str | None:
    """The llama3 flavor whose weights have these shapes (what model.flavor to train or generate with)."""
    from torchtitan.models.llama3 import llama3_flavors

    def shape(a) -> tuple:
        return a.dim, a.n_layers, a.n_heads, a.kv_heads, a.vocab_size, a.ffn_hidden_dim

    return next((name for name, fl in llama3_flavors.items() if shape(fl) == shape(args)), None)


def llama_hf_config(args, dtype: torch.dtype) -> dict:
    """config.json for transformers' LlamaForCausalLM (both the v4 and v5 rope keys)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": args.rope_theta}
    scaling = None
    if args.rope_scaling is not None:
        s = args.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
        rope = {**scaling, "rope_theta": args.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "rope_theta": args.rope_theta, "rope_scaling": scaling, "rope_parameters": rope,
        "torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch."),
    }


# HF model_type -> our train spec name.
HF_MODEL_TYPES = {"llama": "llama3", "olmo": "olmo", "olmo2": "olmo2"}


def model_from_hf_config(cfg: dict, folder: str, name: str | None = None):
    """(train spec, model args, matching flavor or None) for an HF config.json.

    Llama is mapped here; other families bring `from_hf_config` on their state_dict_adapter.
    """
    from torchtitan.models import get_train_spec

    model_type = cfg.get("model_type", "llama")
    name = name or HF_MODEL_TYPES.get(model_type)
    if name is None:
        raise CheckpointError(f"HF checkpoint {folder}: model_type {model_type!r} is not one of "
                              f"{', '.join(HF_MODEL_TYPES)}; pass --model")
    spec = get_train_spec(name)
    if name == "llama3":
        args, flavor = llama_args_from_hf_config(cfg, folder)
        return spec, args, flavor
    adapter_cls = spec.state_dict_adapter
    if adapter_cls is None or not hasattr(adapter_cls, "from_hf_config"):
        raise CheckpointError(f"model {name} has no HF config mapping (state_dict_adapter.from_hf_config)")
    args = adapter_cls.from_hf_config(cfg).args
    from torchtitan.components.checkpoint_io import expected_shapes

    want = expected_shapes(args, spec.model_cls)
    flavor = next((fl for fl, fa in spec.flavors.items() if expected_shapes(fa, spec.model_cls) == want), None)
    return spec, args, flavor


def hf_config_for(adapter, args, dtype: torch.dtype) -> dict:
    """config.json: the adapter's own (OLMo) or the Llama mapping above."""
    if hasattr(adapter, "hf_config"):
        return adapter.hf_config(dtype)
    return llama_hf_config(args, dtype)


# --------------------------------------------------------------------- HF <-> native
def hf_to_native(hf_sd: dict[str, torch.Tensor], adapter, folder: str, tie_word_embeddings: bool = False) -> dict:
    """Adapter renames + permutations; tied HF models get an explicit output matrix (ours is untied)."""
    if tie_word_embeddings and "lm_head.weight" not in hf_sd and "model.embed_tokens.weight" in hf_sd:
        hf_sd = {**hf_sd, "lm_head.weight": hf_sd["model.embed_tokens.weight"].clone()}
    try:
        return adapter.from_hf(hf_sd)
    except KeyError as e:
        raise CheckpointError(f"HF checkpoint {folder}: {e.args[0]} has no native name for this model") from None


def hf_native_shapes(folder: str, adapter) -> dict[str, tuple]:
    """Native name -> (shape,) of an HF folder, from the headers; unmappable names kept as reported extras."""
    tied = os.path.isfile(os.path.join(folder, CONFIG_FILE)) and bool(read_hf_config(folder).get("tie_word_embeddings"))
    out = {}
    for hk, (shape, _) in read_hf_shapes(folder).items():
        if not hk.endswith("rotary_emb.inv_freq"):
            out[adapter.native_key(hk) or hk] = (shape,)
    if tied and "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def load_hf_into_model(model_wrapper, adapter, folder: str) -> None:
    """checkpoint.initial_load_path = an HF folder: every rank reads full tensors, keeps its shard."""
    want = model_wrapper.state_dict()
    dtypes = {v.dtype for v in want.values()}
    # Shapes first (headers only), so another flavor fails before any tensor is read.
    check_fits(folder, hf_native_shapes(folder, adapter), state_shapes(want), what="HF checkpoint")
    tied = os.path.isfile(os.path.join(folder, CONFIG_FILE)) and bool(read_hf_config(folder).get("tie_word_embeddings"))
    hf_sd = read_hf_state_dict(folder, dtype=dtypes.pop() if len(dtypes) == 1 else None)
    model_wrapper.load_full_state_dict(hf_to_native(hf_sd, adapter, folder, tied))


def native_to_hf(native: dict[str, torch.Tensor], adapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    hf = adapter.to_hf(native)
    return {k: (v.to(dtype) if dtype is not None and torch.is_floating_point(v) else v) for k, v in hf.items()}
