"""What the checkpoint scripts share: import path, dtype flags, the model, one-line errors."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from torchtitan.checkpoint.io import ModelInfo, model_from_marker  # noqa: E402
from torchtitan.config import load_config  # noqa: E402
from torchtitan.models import get_train_spec  # noqa: E402
from torchtitan.tools.dtypes import DTYPES  # noqa: E402
from torchtitan.tools.errors import CheckpointError, UserError  # noqa: E402

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


def main_guard(fn: Callable[[], int]) -> None:
    """Known problems (bad folders, shapes, flags) are one line on stderr and exit status 1."""
    try:
        sys.exit(fn())
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
