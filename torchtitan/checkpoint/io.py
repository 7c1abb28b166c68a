"""Checkpoint folders on disk: step folders, completion markers, DCP metadata, fit checks.

Shared by the CheckpointManager (training), the conversion scripts and
scripts/generate.py, so that every entry point reports a bad folder the same
way: one CheckpointError naming the folder and what is wrong with it.

A step folder is a plain DCP checkpoint plus a `.complete` JSON marker written
last. The marker records what the folder holds (kind) and the model: family
name, flavor and args, so that tools such as convert_dcp_to_hf.py and
generate.py rebuild it with no config and no --model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
import typing
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from torchtitan.models import get_train_spec
from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.spec import TrainSpec
from torchtitan.tools.errors import CheckpointError, ConfigError

MARKER = ".complete"
DCP_METADATA = ".metadata"
STEP_RE = re.compile(r"step-(\d+)")
# Markers written before they recorded the model name describe Llama 3 models.
DEFAULT_MODEL_NAME = "llama3"


class StepFolder(NamedTuple):
    step: int
    path: str
    complete: bool


def step_folders(root: str) -> list[StepFolder]:
    """Every step-N folder under root, by step; complete means its marker exists."""
    out = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            m = STEP_RE.fullmatch(name)
            path = os.path.join(root, name)
            if m and os.path.isdir(path):
                out.append(StepFolder(int(m.group(1)), path, os.path.isfile(os.path.join(path, MARKER))))
    return sorted(out)


def read_marker(path: str) -> dict:
    """The marker of a complete step folder; a corrupt marker is an error, not a silent skip."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {MARKER} marker ({e}); "
                              f"delete the folder if the save was interrupted") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"checkpoint {path}: {MARKER} marker is not a JSON object")
    return info


def write_marker(path: str, info: dict) -> None:
    """Atomic (tmp + rename), so a crash never leaves a half-written marker that reads as complete."""
    tmp = os.path.join(path, MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MARKER))


def read_json(folder: str, name: str, what: str) -> dict:
    """A JSON file of a checkpoint folder (config.json, params.json), or an error naming it."""
    try:
        with open(os.path.join(folder, name)) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {folder}: no {name}") from None
    except ValueError as e:
        raise CheckpointError(f"{what} {folder}: unreadable {name} ({e})") from None


def read_dcp_metadata(path: str) -> Metadata:
    """DCP metadata of a folder, or a CheckpointError that says why the folder is not a checkpoint."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path}: no such folder")
    if not os.path.isfile(os.path.join(path, DCP_METADATA)):
        has_data = any(f.endswith(".distcp") for f in os.listdir(path))
        why = ("has .distcp data but no .metadata: the save was interrupted" if has_data
               else "is not a DCP checkpoint (no .metadata file)")
        raise CheckpointError(f"checkpoint {path} {why}")
    try:
        return dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable metadata means the same thing to the user
        raise CheckpointError(f"checkpoint {path}: corrupt .metadata ({type(e).__name__}: {e})") from None


def top_level_keys(meta: Metadata) -> set[str]:
    return {k.split(".", 1)[0] for k in meta.state_dict_metadata}


def model_shapes(meta: Metadata, prefix: str = "model.") -> dict[str, tuple[torch.Size, torch.dtype]]:
    """FQN -> (global shape, dtype) of the model tensors in a DCP checkpoint."""
    out = {}
    for key, md in meta.state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(md, TensorStorageMetadata):
            out[key[len(prefix):]] = (md.size, md.properties.dtype)
    return out


def _all_keys_across_ranks(keys: set[str]) -> set[str]:
    """Pipeline stages hold only their own parameters; the union is the whole model."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return keys
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(keys))
    return set().union(*map(set, gathered))


def _examples(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")


def check_fits(source: str, have: dict[str, tuple], want: dict[str, tuple], *, what: str = "checkpoint",
               union_across_ranks: bool = True, hint: str = "") -> None:
    """Raise one CheckpointError listing missing, unexpected and mis-shaped tensors.

    have/want map FQN -> (shape, ...). DCP would load a checkpoint of another
    flavor partly or fail deep inside its planner; this says which tensors and
    shapes differ, before anything is read.
    """
    want_all = _all_keys_across_ranks(set(want)) if union_across_ranks else set(want)
    missing = sorted(k for k in want if k not in have)
    unexpected = sorted(k for k in have if k not in want_all)
    shape = sorted(f"{k} is {list(have[k][0])} in the {what} but {list(want[k][0])} in the model"
                   for k in want if k in have and tuple(have[k][0]) != tuple(want[k][0]))
    problems = []
    if shape:
        problems.append(f"{len(shape)} tensor(s) differ in shape: {_examples(shape, 2)}")
    if missing:
        problems.append(f"{len(missing)} model tensor(s) missing from the {what}: {_examples(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the {what} that the model does not have: "
                        f"{_examples(unexpected)}")
    if problems:
        raise CheckpointError(f"{what} {source} does not fit this model: " + "; ".join(problems)
                              + (hint or "; was it written for another model.name/model.flavor (or vocab_size)?"))


def state_shapes(state_dict: dict[str, Any]) -> dict[str, tuple]:
    """FQN -> (global shape,) of a model state dict (DTensors report their global shape)."""
    return {k: (tuple(v.shape),) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def expected_shapes(spec: TrainSpec, args: DecoderArgs) -> dict[str, tuple]:
    """Name -> (shape,) of every tensor a model needs, from its args alone (meta device, no memory)."""
    with torch.device("meta"):
        model = spec.build_model(args)
    return {k: (tuple(v.shape),) for k, v in model.state_dict().items()}


def dcp_error_detail(e: BaseException) -> str:
    """The root cause inside DCP's CheckpointException (a BaseException wrapping per-rank tracebacks)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, BaseException):
            return dcp_error_detail(inner)
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:500]


def load_model_from_dcp(path: str, model_state: dict[str, torch.Tensor], meta: Metadata | None = None,
                        piece: bool = False) -> None:
    """Read the `model` entry of a DCP folder into model_state (any layout; casts to its dtypes), collectively
    when a process group exists. piece=True: model_state is a subset of the checkpoint's tensors, read by this
    process alone (a caller going through a checkpoint in pieces)."""
    if not piece:
        meta = meta or read_dcp_metadata(path)
        check_fits(path, model_shapes(meta), state_shapes(model_state))
    try:
        dcp.load({"model": model_state}, checkpoint_id=path, no_dist=piece or not dist.is_initialized())
    except BaseException as e:  # noqa: BLE001 - DCP raises CheckpointException, a BaseException
        if isinstance(e, KeyboardInterrupt):
            raise
        raise CheckpointError(f"checkpoint {path}: reading the model weights failed, the files are corrupt or "
                              f"truncated ({dcp_error_detail(e)})") from None


def read_model_from_dcp(path: str, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], Metadata]:
    """All model tensors of a DCP folder as plain tensors (stored dtype unless dtype is given), one process."""
    meta = read_dcp_metadata(path)
    shapes = model_shapes(meta)
    if not shapes:
        raise CheckpointError(f"checkpoint {path} holds no model weights "
                              f"(keys: {', '.join(sorted(top_level_keys(meta)))})")
    sd = {k: torch.empty(size, dtype=dtype or dt) for k, (size, dt) in shapes.items()}
    load_model_from_dcp(path, sd, meta)
    return sd, meta


# ------------------------------------------------------------------ the model in markers
@dataclass(frozen=True)
class ModelInfo:
    """The model a checkpoint holds: enough to rebuild it with no config."""

    name: str  # model.name, the family
    flavor: str | None  # model.flavor, None for converted weights no flavor equals
    args: DecoderArgs
    tokenizer: str | None = None  # the tokenizer the weights were trained with (its path), when known

    @property
    def spec(self) -> TrainSpec:
        return get_train_spec(self.name)

    def marker_fields(self) -> dict:
        fields = {"model": self.name, "flavor": self.flavor, "model_args": model_args_to_dict(self.args)}
        return fields | ({"tokenizer": self.tokenizer} if self.tokenizer else {})


def marker_info(step: int, kind: str, model: ModelInfo | None, **extra: Any) -> dict:
    """What a `.complete` marker records; every writer (manager, conversions) builds it here."""
    info = {"step": step, "kind": kind, "time": time.time(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1, **extra}
    if model is not None:
        info.update(model.marker_fields())
    return info


def model_from_marker(marker: dict, path: str) -> ModelInfo | None:
    """The model a marker records (None when it records no args: pass --config/--flavor then)."""
    name = marker.get("model", DEFAULT_MODEL_NAME)
    try:
        spec = get_train_spec(name)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path}: {MARKER} names {e}") from None
    if not marker.get("model_args"):
        return None
    args = model_args_from_dict(spec.args_class(), marker["model_args"])
    return ModelInfo(name, marker.get("flavor") or spec.matching_flavor(args), args, marker.get("tokenizer"))


def model_args_to_dict(args: Any) -> dict:
    """JSON-able model args (nested dataclasses such as RopeScaling become dicts, with their `kind`)."""
    return dataclasses.asdict(args)


def _nested_from_dict(name: str, hint: Any, value: dict) -> Any:
    """A nested dataclass field from its dict. Of a union of dataclasses (RopeScaling | YarnScaling) the dict's
    `kind` names the one; a dict without one (markers written before YaRN) is the first."""
    classes = [c for c in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(c)]
    if not classes:
        return value
    kinds = {f.default: c for c in classes for f in dataclasses.fields(c) if f.name == "kind"}
    cls = kinds.get(value["kind"]) if "kind" in value else classes[0]
    if cls is None:
        raise CheckpointError(f"model args {name}: kind {value['kind']!r} is not one of {', '.join(map(repr, kinds))}")
    init = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - init - {"kind"})
    if unknown:
        raise CheckpointError(f"model args {name}: {', '.join(unknown)} are not fields of {cls.__name__}")
    return cls(**{k: v for k, v in value.items() if k in init})


def model_args_from_dict(args_cls: type, d: dict) -> Any:
    """Args of `args_cls` from a dict (restoring nested dataclass fields); unknown keys are errors."""
    hints = typing.get_type_hints(args_cls)
    known = {f.name for f in dataclasses.fields(args_cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise CheckpointError(f"model args {', '.join(unknown)} are not fields of {args_cls.__name__}")
    values = {name: _nested_from_dict(name, hints[name], value) if isinstance(value, dict) else value
              for name, value in d.items()}
    return args_cls(**values)


# -------------------------------------------------------------- writing model-only folders
def ensure_new_output(out_dir: str) -> None:
    """Conversions never overwrite: an existing non-empty output folder is an error."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise CheckpointError(f"output {out_dir} already exists and is not empty; refusing to overwrite it "
                              f"(remove it or pick another folder)")


class staged_output:
    """Write into a temporary sibling folder and rename it into place only on success.

    A conversion that fails halfway (missing tensor, disk full) leaves nothing
    at out_dir, so a later run never mistakes a partial output for a checkpoint.
    """

    def __init__(self, out_dir: str):
        self.out_dir = os.path.abspath(out_dir)
        self.tmp = ""

    def __enter__(self) -> str:
        ensure_new_output(self.out_dir)
        parent = os.path.dirname(self.out_dir)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out_dir)}.partial-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        ensure_new_output(self.out_dir)
        if os.path.isdir(self.out_dir):
            os.rmdir(self.out_dir)  # empty, checked above
        os.rename(self.tmp, self.out_dir)


def write_model_checkpoint(model_state: dict[str, torch.Tensor], out_dir: str, info: dict) -> None:
    """A model-only DCP step folder ({"model": ...} + marker), loadable as a step checkpoint or initial_load_path.

    Every tool that writes DCP weights goes through here: staged (nothing at out_dir unless it all
    worked) and marked complete, like the trainer's own saves."""
    with staged_output(out_dir) as tmp:
        dcp.save({"model": model_state}, checkpoint_id=tmp, no_dist=True)
        write_marker(tmp, info)
