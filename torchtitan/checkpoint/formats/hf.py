"""Hugging Face safetensors folders <-> our state dicts, via the model's state_dict_adapter.

Reading and writing go through DCP's HuggingFaceStorageReader/Writer
(torch.distributed.checkpoint, public since torch 2.8), which read tensor slices
straight from safetensors files and write `model-0000i-of-0000N.safetensors`
plus `model.safetensors.index.json`.

Names, the q/k rotary permutation, MoE expert stacking and config.json <->
model args are the family's adapter's job (models/common/adapter.py); this module moves tensors and
finds the family from config.json's model_type.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader

from torchtitan.checkpoint.io import (
    ModelInfo,
    check_fits,
    dcp_error_detail,
    ensure_new_output,
    expected_shapes,
    load_model_from_dcp,
    model_shapes,
    read_dcp_metadata,
    read_json,
    staged_output,
    state_shapes,
)
from torchtitan.models import get_train_spec, model_names, spec_for_hf_model_type
from torchtitan.models.common.adapter import StateDictAdapter
from torchtitan.tools.errors import CheckpointError

logger = logging.getLogger("torchtitan")

INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 4 * 2**30  # size of one safetensors file when the count is left to us
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


def read_hf_shapes(folder: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """HF name -> (shape, dtype), from the safetensors headers only."""
    out = {}
    for path in hf_weight_files(folder):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    out[key] = (torch.Size(sl.get_shape()), _st_dtype(sl.get_dtype()))
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise CheckpointError(f"HF checkpoint {path}: unreadable safetensors file "
                                  f"({type(e).__name__}: {e})") from None
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
    try:
        dcp.load(sd, storage_reader=HuggingFaceStorageReader(folder), no_dist=True)
    except BaseException as e:  # noqa: BLE001 - DCP raises CheckpointException, a BaseException
        if isinstance(e, KeyboardInterrupt):
            raise
        raise CheckpointError(f"HF checkpoint {folder}: reading the weights failed ({dcp_error_detail(e)})") from None
    return sd


def _shard_plan(sizes: list[tuple[str, int]], num_shards: int) -> dict[str, int]:
    """HF name -> file number (1..N): contiguous runs of names, balanced by bytes, so layers stay together.
    num_shards 0: as many files as it takes to keep each near SHARD_BYTES."""
    total = sum(n for _, n in sizes)
    if num_shards <= 0:
        num_shards = -(-total // SHARD_BYTES)
    num_shards = max(1, min(num_shards, len(sizes)))
    mapping, acc = {}, 0
    for name, n in sizes:
        mapping[name] = min(num_shards, 1 + acc * num_shards // max(total, 1))
        acc += n
    renumber = {old: new for new, old in enumerate(sorted(set(mapping.values())), start=1)}  # no empty files
    return {name: renumber[i] for name, i in mapping.items()}


def write_hf_shards(folder: str, sizes: list[tuple[str, int]], groups: Iterable[dict[str, torch.Tensor]],
                    num_shards: int = 0) -> None:
    """model-0000i-of-0000N.safetensors + model.safetensors.index.json (what from_pretrained reads), written one
    file at a time from `groups` (dicts of HF-named tensors arriving in the order of `sizes`): memory holds at
    most one group and one file's tensors."""
    mapping = _shard_plan(sizes, num_shards)
    n_files = max(mapping.values())
    names = {i: f"model-{i:05d}-of-{n_files:05d}.safetensors" for i in range(1, n_files + 1)}
    current: dict[str, torch.Tensor] = {}
    number, weight_map = 1, {}

    def flush() -> None:
        if current:
            save_file(current, os.path.join(folder, names[number]), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(current, names[number]))
            current.clear()

    for group in groups:
        for name, tensor in group.items():
            if mapping[name] != number:
                flush()
                number = mapping[name]
            current[name] = tensor.contiguous()
    flush()
    missing = sorted(set(mapping) - set(weight_map))
    if missing:
        raise CheckpointError(f"HF export {folder}: no tensor arrived for {missing[:3]}")
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": weight_map}, f, indent=2)


def write_hf_state_dict(hf_sd: dict[str, torch.Tensor], folder: str, num_shards: int = 1) -> None:
    """An in-memory HF state dict as safetensors files + index."""
    write_hf_shards(folder, [(k, v.numel() * v.element_size()) for k, v in hf_sd.items()], [hf_sd], num_shards)


# ------------------------------------------------------------------ config.json <-> args
def read_hf_config(folder: str) -> dict:
    return read_json(folder, CONFIG_FILE, "HF checkpoint")


def hf_tied(folder: str) -> bool:
    """Whether the folder's config.json ties the output matrix to the embedding (no lm_head.weight)."""
    return os.path.isfile(os.path.join(folder, CONFIG_FILE)) and bool(read_hf_config(folder).get("tie_word_embeddings"))


def model_from_hf_config(config: dict, folder: str, name: str | None = None) -> ModelInfo:
    """The family (from model_type, or `name`), its args and the flavor equal to them (or None)."""
    model_type = config.get("model_type", "llama")
    spec = get_train_spec(name) if name else spec_for_hf_model_type(model_type)
    if spec is None:
        known = ", ".join(get_train_spec(n).state_dict_adapter.hf_model_type for n in model_names())
        raise CheckpointError(f"HF checkpoint {folder}: model_type {model_type!r} is not one of {known}; pass --model")
    args = spec.state_dict_adapter.args_from_hf_config(config, folder)
    return ModelInfo(spec.name, spec.matching_flavor(args), args)


# --------------------------------------------------------------------- HF <-> native
def hf_native_shapes(folder: str, adapter: StateDictAdapter) -> dict[str, tuple]:
    """Native name -> (shape,) of an HF folder, from the headers; unmappable names kept as reported extras.
    Where the adapter joins several HF tensors into one native tensor (MoE experts, one HF tensor each) or splits
    one into several (gpt-oss's fused gate/up experts), its from_hf does so on meta tensors: the shapes are
    whatever it makes of them, at no memory cost."""
    shapes = {hk: shape for hk, (shape, _) in read_hf_shapes(folder).items() if not adapter.skipped(hk)}
    sources: dict[str, list[str]] = {}
    for hk in shapes:
        sources.setdefault(adapter.native_key(hk) or hk, []).append(hk)
    out = {}
    for key, hks in sources.items():
        if len(hks) == 1 and adapter.native_key(hks[0]) is None:
            out[key] = (shapes[hks[0]],)  # no native name: reported by the caller's shape check
            continue
        try:
            joined = adapter.from_hf({hk: torch.empty(shapes[hk], device="meta") for hk in hks})
        except CheckpointError as e:
            raise CheckpointError(f"HF checkpoint {folder}: {e}") from None
        out.update({k: (v.shape,) for k, v in joined.items()})
    if hf_tied(folder) and "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def read_hf_as_native(folder: str, adapter: StateDictAdapter, dtype: torch.dtype | None = None) -> dict:
    """Every tensor of an HF folder under its native name (stored dtype unless dtype is given)."""
    hf_sd = read_hf_state_dict(folder, dtype=dtype)
    try:
        return adapter.from_hf(hf_sd, hf_tied=hf_tied(folder))
    except CheckpointError as e:
        raise CheckpointError(f"HF checkpoint {folder}: {e}") from None


def load_hf_into_model(model_wrapper, adapter: StateDictAdapter, folder: str) -> None:
    """checkpoint.initial_load_path = an HF folder: every rank reads full tensors, keeps its shard.

    model_wrapper: a checkpoint ModelWrapper (state_dict() and load_full_state_dict())."""
    want = model_wrapper.state_dict()
    dtypes = {v.dtype for v in want.values()}
    # Shapes first (headers only), so another flavor fails before any tensor is read.
    check_fits(folder, hf_native_shapes(folder, adapter), state_shapes(want), what="HF checkpoint")
    model_wrapper.load_full_state_dict(read_hf_as_native(folder, adapter, dtypes.pop() if len(dtypes) == 1 else None))


def native_to_hf(native: dict[str, torch.Tensor], adapter: StateDictAdapter,
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    hf = adapter.to_hf(native)
    return {k: (v.to(dtype) if dtype is not None and torch.is_floating_point(v) else v) for k, v in hf.items()}


def write_hf_folder(native: dict[str, torch.Tensor], adapter: StateDictAdapter, out_dir: str,
                    dtype: torch.dtype | None = None, num_shards: int = 1) -> tuple[int, torch.dtype]:
    """An HF folder transformers loads (safetensors + config.json) from native tensors in memory, staged: nothing
    at out_dir unless it all worked. Returns (tensor count, dtype written)."""
    ensure_new_output(out_dir)
    hf_sd = native_to_hf(native, adapter, dtype)
    out_dtype = dtype or next(iter(hf_sd.values())).dtype
    with staged_output(out_dir) as tmp:
        write_hf_state_dict(hf_sd, tmp, num_shards)
        _write_config(tmp, adapter, out_dtype)
    return len(hf_sd), out_dtype


def _write_config(folder: str, adapter: StateDictAdapter, dtype: torch.dtype) -> None:
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(adapter.hf_config(dtype), f, indent=2)


def _layer_groups(keys: list[str]) -> list[list[str]]:
    """Consecutive keys grouped by block (layers.N.*); the embedding and the head form their own groups. The
    adapter's to_hf sees a whole block, so it may split a tensor of the block into several HF ones."""
    groups: list[list[str]] = []
    last = None
    for k in keys:
        unit = ".".join(k.split(".")[:2]) if k.startswith("layers.") else k.split(".")[0]
        if unit != last:
            groups.append([])
            last = unit
        groups[-1].append(k)
    return groups


def export_dcp_to_hf(dcp_dir: str, out_dir: str, model: ModelInfo, dtype: torch.dtype | None = None,
                     num_shards: int = 0) -> tuple[int, torch.dtype]:
    """The model weights of a DCP folder as an HF folder, read and written one block at a time (memory: the
    largest block plus one output file, not the model), staged. Runs in one process. Returns (tensors, dtype)."""
    ensure_new_output(out_dir)
    stored = model_shapes(read_dcp_metadata(dcp_dir))
    want = expected_shapes(model.spec, model.args)
    check_fits(dcp_dir, {k: (size,) for k, (size, _) in stored.items()}, want, union_across_ranks=False)
    adapter = model.spec.adapter(model.args)
    keys = [k for k in want if k in stored]
    out_dtype = dtype or stored[keys[0]][1]
    # HF names and sizes from the adapter's to_hf on the meta device: one native tensor may be several HF ones
    # (MoE experts), and a tied output none.
    meta = adapter.to_hf({k: torch.empty(stored[k][0], dtype=out_dtype, device="meta") for k in keys})
    sizes = [(hk, v.numel() * out_dtype.itemsize) for hk, v in meta.items()]

    def groups():
        for group in _layer_groups(keys):
            native = {k: torch.empty(stored[k][0], dtype=stored[k][1]) for k in group}
            load_model_from_dcp(dcp_dir, native, piece=True)
            yield native_to_hf(native, adapter, dtype)

    with staged_output(out_dir) as tmp:
        write_hf_shards(tmp, sizes, groups(), num_shards)
        _write_config(tmp, adapter, out_dtype)
    return len(sizes), out_dtype
