"""What the checkpoint scripts share: import path, dtype flags, the model, one-line errors."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from torchtitan.checkpoint import ModelWrapper  # noqa: E402
from torchtitan.checkpoint.formats.hf import (  # noqa: E402
    hf_native_shapes,
    load_hf_into_model,
    model_from_hf_config,
    read_hf_config,
)
from torchtitan.checkpoint.io import (  # noqa: E402
    MARKER,
    ModelInfo,
    check_fits,
    load_model_from_dcp,
    model_from_marker,
    model_shapes,
    read_dcp_metadata,
    read_marker,
    state_shapes,
)
from torchtitan.config import load_config  # noqa: E402
from torchtitan.models import get_train_spec  # noqa: E402
from torchtitan.models.common.adapter import StateDictAdapter  # noqa: E402
from torchtitan.tools.dtypes import DTYPES  # noqa: E402
from torchtitan.tools.errors import CheckpointError, UserError  # noqa: E402

DEFAULT_TOKENIZER = os.path.join(ROOT, "torchtitan", "assets", "tokenizer")
DTYPE_CHOICES = ("keep", "float32", "bfloat16", "float16")


def parse_dtype(name: str):
    """None keeps each tensor's stored dtype (what makes round trips bitwise)."""
    return None if name == "keep" else DTYPES[name]


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="training TOML: model.name, model.flavor and model.vocab_size come from it")
    p.add_argument("--model", default=None, help="model family (default: what the checkpoint's marker records)")
    p.add_argument("--flavor", default=None, help="model flavor, e.g. debugmodel, 8B")
    p.add_argument("--vocab-size", type=int, default=None, help="override the flavor's vocab_size")


def resolve_model(a: argparse.Namespace, marker: dict | None = None, path: str = "") -> ModelInfo:
    """The model from --config/--model/--flavor, else from a checkpoint marker (family, flavor and args)."""
    cfg = load_config(["--job.config_file", a.config], env={}) if a.config else None
    flavor = a.flavor or (cfg.model.flavor if cfg else None)
    if flavor is None and marker:
        recorded = model_from_marker(marker, path)
        if recorded is not None and (a.model is None or a.model == recorded.name):
            return recorded
    name = a.model or (cfg.model.name if cfg else None) or (marker or {}).get("model", "llama3")
    spec = get_train_spec(name)
    if flavor is None:
        raise CheckpointError("no model args: pass --config or --flavor (the checkpoint's .complete marker records "
                              "none)")
    args = spec.model_args(flavor)
    vocab = a.vocab_size or (cfg.model.vocab_size if cfg and cfg.model.vocab_size > 0 else None)
    if vocab:
        args.vocab_size = vocab
    return ModelInfo(name, flavor, args)


def checkpoint_kind(path: str) -> str:
    if os.path.isfile(path):
        return "pt"
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path}: no such file or folder")
    files = os.listdir(path)
    if ".metadata" in files:
        return "dcp"
    if any(f.endswith(".safetensors") for f in files):
        return "hf"
    raise CheckpointError(f"checkpoint {path} is neither a DCP folder (.metadata), an HF folder (*.safetensors) nor a "
                          ".pt file")


def model_for(a, kind: str) -> ModelInfo:
    """--config/--flavor if given, else what the checkpoint says about itself (HF config.json or our marker)."""
    if kind == "hf" and not (a.config or a.flavor):
        return model_from_hf_config(read_hf_config(a.checkpoint), a.checkpoint, a.model)
    marker = {}
    if kind == "dcp" and os.path.isfile(os.path.join(a.checkpoint, MARKER)):
        marker = read_marker(a.checkpoint)
    return resolve_model(a, marker, a.checkpoint)


def _read_pt(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path}: not a readable torch file ({type(e).__name__}: {e})") from None
    # dcp_to_torch output nests the weights under "model"; Meta's consolidated.00.pth is flat.
    sd = obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    return {k: v for k, v in sd.items() if k != "rope.freqs"}


def check_checkpoint_fits(model, path: str, kind: str, adapter: StateDictAdapter) -> None:
    """Shapes from headers/metadata against the model still on the meta device: a wrong flavor fails
    before gigabytes are allocated."""
    want = state_shapes(model.state_dict())
    if kind == "dcp":
        have, what = model_shapes(read_dcp_metadata(path)), "checkpoint"
    elif kind == "hf":
        have, what = hf_native_shapes(path, adapter), "HF checkpoint"
    else:
        have, what = state_shapes(_read_pt(path)), ".pt checkpoint"
    check_fits(path, have, want, what=what, union_across_ranks=False)


def load_weights(model, path: str, kind: str, adapter: StateDictAdapter) -> None:
    if kind == "dcp":
        load_model_from_dcp(path, model.state_dict())  # the state dict's tensors alias the parameters
    elif kind == "hf":
        load_hf_into_model(ModelWrapper([model]), adapter, path)
    else:
        model.load_state_dict(_read_pt(path), strict=True)


def tokenizer_for(a: argparse.Namespace, kind: str, info: ModelInfo) -> str:
    """--tokenizer, else the HF folder's tokenizer.json, else the one the checkpoint's marker names, else --config's,
    else the bundled one."""
    if a.tokenizer:
        return a.tokenizer
    if kind == "hf" and os.path.isfile(os.path.join(a.checkpoint, "tokenizer.json")):
        return os.path.join(a.checkpoint, "tokenizer.json")
    if info.tokenizer:
        if not os.path.exists(info.tokenizer):
            raise CheckpointError(f"checkpoint {a.checkpoint}: its tokenizer {info.tokenizer} (from {MARKER}) no "
                                  "longer exists; pass --tokenizer")
        return info.tokenizer
    if a.config:
        path = load_config(["--job.config_file", a.config], env={}).model.tokenizer_path
        if path:
            return path
    return DEFAULT_TOKENIZER


def load_model(a: argparse.Namespace, kind: str, info: ModelInfo, device: torch.device,
               shard: Callable[[torch.nn.Module], None] | None = None):
    """The checkpoint's model on `device` in eval mode, its shapes checked before any weight is allocated.
    shard: applied on the meta device (FSDP over several processes: each holds and loads only its shards)."""
    model = info.spec.build_meta_model(info.args)
    adapter = info.spec.adapter(info.args)
    check_checkpoint_fits(model, a.checkpoint, kind, adapter)
    if shard is not None:
        if kind == "pt":
            raise CheckpointError(f"checkpoint {a.checkpoint}: a .pt file is read whole by one process; convert it "
                                  "to DCP (scripts/convert_llama_to_dcp.py) or evaluate it in one process")
        shard(model)
    model.to_empty(device=device)
    model.init_weights(buffer_device=device)  # also builds the RoPE table, which checkpoints never hold
    load_weights(model, a.checkpoint, kind, adapter)
    return model.eval()


def main_guard(fn: Callable[[], int]) -> None:
    """Known problems (bad folders, shapes, flags) are one line on stderr and exit status 1."""
    try:
        sys.exit(fn())
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
