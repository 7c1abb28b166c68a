"""What the checkpoint scripts share: import path, dtype flags, model args, one-line errors."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DTYPE_CHOICES = ("keep", "float32", "bfloat16", "float16")


def parse_dtype(name: str):
    """None keeps each tensor's stored dtype (what makes round trips bitwise)."""
    from torchtitan.components.checkpoint_io import DTYPES

    return None if name == "keep" else DTYPES[name]


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="training TOML: model.name, model.flavor and model.vocab_size come from it")
    p.add_argument("--model", default=None, help="model family (train spec name); default llama3")
    p.add_argument("--flavor", default=None, help="model flavor, e.g. debugmodel, 8B")
    p.add_argument("--vocab-size", type=int, default=None, help="override the flavor's vocab_size")


def resolve_model(a: argparse.Namespace, marker: dict | None = None, overrides: list[str] | None = None):
    """(train spec, model args) from --config/--model/--flavor, else from a checkpoint marker's
    model_args (and "model", which converted folders record; training markers default to llama3)."""
    from torchtitan.components.checkpoint_io import CheckpointError, model_args_from_dict
    from torchtitan.models import get_train_spec

    cfg = None
    if a.config or overrides:
        from torchtitan.config import load_config

        cfg = load_config([*(["--job.config_file", a.config] if a.config else []), *(overrides or [])], env={})
    marker = marker or {}
    name = a.model or (cfg.model.name if cfg else marker.get("model", "llama3"))
    spec = get_train_spec(name)
    flavor = a.flavor or (cfg.model.flavor if cfg else None)
    if flavor is not None:
        import dataclasses

        args = dataclasses.replace(spec.model_args(flavor))
        vocab = a.vocab_size or (cfg.model.vocab_size if cfg and cfg.model.vocab_size > 0 else None)
        if vocab:
            args.vocab_size = vocab
        return spec, args
    if marker.get("model_args"):
        return spec, model_args_from_dict(next(iter(spec.flavors.values())), marker["model_args"])
    raise CheckpointError("no model args: pass --config or --flavor (the checkpoint's .complete marker records none)")


def main_guard(fn: Callable[[], int]) -> None:
    """Known problems (bad folders, shapes, flags) are one line on stderr and exit status 1."""
    from torchtitan.components.checkpoint_io import CheckpointError
    from torchtitan.config.manager import ConfigError

    try:
        sys.exit(fn())
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
