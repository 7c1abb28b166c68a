"""Meta's original Llama format: params.json + consolidated.NN.pth, one file per model-parallel rank.

Meta's reference code (github.com/meta-llama/llama3, llama/model.py) shards with
fairscale: ColumnParallelLinear splits the output features (dim 0 of the
weight) -- wq, wk, wv, w1, w3 and output; RowParallelLinear splits the input
features (dim 1) -- wo, w2; norms are replicated. The embedding differs between
generations: Llama 3 uses VocabParallelEmbedding (vocab rows, dim 0), Llama 2
ParallelEmbedding (embedding columns, dim 1). We read the embedding's dim from
the shard shapes, so both load. Our model keeps Meta's parameter names, so
merging is the whole conversion; RoPE tables (`rope.freqs`) are derived and dropped.
"""
from __future__ import annotations

import glob
import os
import re

import torch

from torchtitan.checkpoint.io import read_json
from torchtitan.models.common.rope import RopeScaling
from torchtitan.models.llama3.args import LlamaModelArgs
from torchtitan.tools.errors import CheckpointError

# Parameter name pattern -> concat dim across model-parallel shards (None: replicated).
SHARD_DIM: list[tuple[re.Pattern, int | None]] = [
    (re.compile(r"layers\.\d+\.attention\.w[qkv]\.weight"), 0),
    (re.compile(r"layers\.\d+\.feed_forward\.w[13]\.weight"), 0),
    (re.compile(r"output\.weight"), 0),
    (re.compile(r"layers\.\d+\.attention\.wo\.weight"), 1),
    (re.compile(r"layers\.\d+\.feed_forward\.w2\.weight"), 1),
    (re.compile(r"layers\.\d+\.(attention_norm|ffn_norm)\.weight"), None),
    (re.compile(r"norm\.weight"), None),
]
DERIVED = {"rope.freqs"}  # Llama 2 stores its RoPE table; ours is recomputed


def read_params(folder: str) -> dict:
    return read_json(folder, "params.json", "Meta checkpoint")


def shard_files(folder: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    if not files:
        raise CheckpointError(f"Meta checkpoint {folder}: no consolidated.NN.pth files")
    numbers = [int(re.search(r"consolidated\.(\d+)\.pth$", f).group(1)) for f in files]
    if numbers != list(range(len(files))):
        raise CheckpointError(f"Meta checkpoint {folder}: shard files are not "
                              f"consolidated.00..{len(files) - 1:02d}.pth "
                              f"(found {', '.join(os.path.basename(f) for f in files)}); is one missing?")
    return files


def _concat_dim(key: str, shards: list[torch.Tensor], params: dict) -> int | None:
    if key == "tok_embeddings.weight":
        if len(shards) == 1:
            return 0
        dim = params.get("dim")
        # Llama 3 VocabParallelEmbedding: full embedding width per shard; Llama 2: a slice of it.
        return 0 if shards[0].shape[1] == dim else 1
    for pattern, d in SHARD_DIM:
        if pattern.fullmatch(key):
            return d
    return None


def merge_shards(shards: list[dict[str, torch.Tensor]], params: dict, folder: str) -> dict[str, torch.Tensor]:
    """One full tensor per name; every shard must hold the same names."""
    names = [k for k in shards[0] if k not in DERIVED]
    for i, sd in enumerate(shards[1:], start=1):
        diff = set(names) ^ (set(sd) - DERIVED)
        if diff:
            raise CheckpointError(f"Meta checkpoint {folder}: consolidated.{i:02d}.pth and consolidated.00.pth hold "
                                  f"different tensors (e.g. {sorted(diff)[0]})")
    out = {}
    for key in names:
        parts = [sd[key] for sd in shards]
        dim = _concat_dim(key, parts, params)
        if dim is None or len(parts) == 1:
            if len(parts) > 1 and any(not torch.equal(parts[0], p) for p in parts[1:]):
                raise CheckpointError(f"Meta checkpoint {folder}: {key} should be replicated but differs across shards")
            out[key] = parts[0]
        else:
            out[key] = torch.cat(parts, dim=dim)
    return out


def load_meta_checkpoint(folder: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Merged state dict (Meta names = our names) and params.json."""
    params = read_params(folder)
    files = shard_files(folder)
    shards = []
    for path in files:
        try:
            # mmap: a 70B shard is read page by page while merging, never all at once.
            shards.append(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"Meta checkpoint {path}: unreadable ({type(e).__name__}: {e})") from None
    return merge_shards(shards, params, folder), params


def llama_args_from_params(params: dict, state_dict: dict[str, torch.Tensor], folder: str) -> LlamaModelArgs:
    """LlamaModelArgs from params.json (vocab_size -1 in Llama 2 files: taken from the embedding)."""
    try:
        args = LlamaModelArgs(dim=int(params["dim"]), n_layers=int(params["n_layers"]), n_heads=int(params["n_heads"]),
                              n_kv_heads=params.get("n_kv_heads"), vocab_size=int(params.get("vocab_size", -1)),
                              multiple_of=int(params.get("multiple_of", 256)),
                              ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
                              norm_eps=float(params.get("norm_eps", 1e-5)),
                              rope_theta=float(params.get("rope_theta", 10000.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"Meta checkpoint {folder}: params.json lacks a field ({e})") from None
    if args.vocab_size <= 0 and "tok_embeddings.weight" in state_dict:
        args.vocab_size = state_dict["tok_embeddings.weight"].shape[0]
    if params.get("use_scaled_rope"):
        # Llama 3.1 uses factor 8; 3.2 files carry the same flag and Meta's code picks 32 for them.
        args.rope_scaling = RopeScaling(factor=float(params.get("rope_scaling_factor", 8.0)))
    return args
