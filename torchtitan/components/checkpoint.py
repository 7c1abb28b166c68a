"""DCP checkpoints: save, resume the newest complete one, reshard, export weights, seed.

Layout: {dump_folder}/{folder}/step-N/ is a plain DCP checkpoint (stock
`torch.distributed.checkpoint` tools read it) plus a `.complete` marker that
rank 0 writes after every rank's data and the DCP metadata are on disk. A
folder without the marker (a save cut by a crash or SIGKILL) is never loaded.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from torchtitan.config.job_config import Checkpoint as CheckpointConfig

logger = logging.getLogger("torchtitan")

MARKER = ".complete"
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATE_KEYS = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the folder and the problem."""


class ModelWrapper(Stateful):
    """All model parts (pipeline stages) as one flat FQN -> tensor dict, DTensor shards kept."""

    def __init__(self, model_parts: list[nn.Module]):
        self.model_parts = model_parts

    def state_dict(self) -> dict:
        sd: dict = {}
        for part in self.model_parts:
            sd.update(get_model_state_dict(part))
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        for part in self.model_parts:
            set_model_state_dict(part, state_dict, options=StateDictOptions(strict=False))


@dataclass
class TrainState(Stateful):
    step: int = 0
    tokens_seen: int = 0
    elapsed_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        # RNG is global (every rank seeds alike), so one copy follows any change of world size.
        return {"step": torch.tensor(self.step), "tokens_seen": torch.tensor(self.tokens_seen),
                "elapsed_seconds": torch.tensor(self.elapsed_seconds), "rng_cpu": torch.get_rng_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])
        self.tokens_seen = int(sd["tokens_seen"])
        self.elapsed_seconds = float(sd["elapsed_seconds"])
        torch.set_rng_state(sd["rng_cpu"])


def step_folders(root: str) -> list[tuple[int, str, bool]]:
    """(step, path, complete) for every step-N folder under root, by step."""
    out = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            m = re.fullmatch(r"step-(\d+)", name)
            if m:
                path = os.path.join(root, name)
                out.append((int(m.group(1)), path, os.path.isfile(os.path.join(path, MARKER))))
    return sorted(out)


def read_marker(path: str) -> dict:
    with open(os.path.join(path, MARKER)) as f:
        return json.load(f)


def checkpoint_keys(path: str) -> set[str]:
    """Top-level state keys present in a DCP folder, or a CheckpointError if it is unreadable."""
    try:
        meta = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable metadata means the same thing to the user
        raise CheckpointError(f"checkpoint {path} is not a readable DCP checkpoint ({type(e).__name__}: {e})") from None
    return {k.split(".", 1)[0] for k in meta.state_dict_metadata}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, dump_folder: str, states: dict[str, Stateful], total_steps: int,
                 model_adapter=None):
        self.cfg = cfg
        self.root = os.path.join(dump_folder, cfg.folder)
        self.states = states
        self.total_steps = total_steps
        self.model_adapter = model_adapter  # for initial loads from HF safetensors
        self.enabled = cfg.enable
        self._pending: tuple[Future, str, int, dict] | None = None
        self._async_pg = None
        self._last_save_time = time.monotonic()
        self.loaded_path: str | None = None
        if self.enabled and cfg.async_mode != "disabled" and dist.is_initialized():
            # A separate gloo group: async DCP on the default group hangs while training uses it (TORCH_ON_CPU.md).
            self._async_pg = dist.new_group(backend="gloo")

    # ---------------------------------------------------------------- loading
    def load(self) -> int:
        """Resume from this run's newest complete checkpoint, else the initial load path. Returns the step."""
        if not self.enabled:
            return 0
        folders = step_folders(self.root)
        for step, path, complete in folders:
            if not complete:
                logger.warning(f"checkpoint {path} is incomplete (no {MARKER}: the save was interrupted); skipping it")
        complete = [(s, p) for s, p, c in folders if c]
        if self.cfg.load_step >= 0:
            match = [p for s, p in complete if s == self.cfg.load_step]
            if not match:
                have = ", ".join(str(s) for s, _ in complete) or "none"
                raise CheckpointError(f"checkpoint.load_step = {self.cfg.load_step}: no complete checkpoint "
                                      f"{self.root}/step-{self.cfg.load_step} (complete steps: {have})")
            return self._load_folder(match[0], self.cfg.load_step)
        resumable = [(s, p) for s, p in complete if read_marker(p).get("kind") != "export" or s == 0]
        if resumable:
            step, path = resumable[-1]
            return self._load_folder(path, step)
        exports = [(s, p) for s, p in complete if read_marker(p).get("kind") == "export"]
        if exports:
            raise CheckpointError(f"{exports[-1][1]} is the final weights-only export of a finished run and no full "
                                  f"checkpoint is left to resume from; use a new job.dump_folder or checkpoint.folder")
        if self.cfg.initial_load_path:
            return self._initial_load(self.cfg.initial_load_path)
        return 0

    def _load_folder(self, path: str, step: int) -> int:
        keys = checkpoint_keys(path)
        if "model" not in keys:
            raise CheckpointError(f"checkpoint {path} has no model weights (keys: {', '.join(sorted(keys))})")
        wanted = [k for k in STATE_KEYS if k in keys and k in self.states and k not in self.cfg.exclude_from_loading]
        model_only = wanted == ["model"]
        logger.info(f"loading checkpoint {path} ({', '.join(wanted)})")
        self._dcp_load({k: self.states[k] for k in wanted}, path)
        self.loaded_path = path
        return 0 if model_only and "train_state" not in keys else step

    def _initial_load(self, path: str) -> int:
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint.initial_load_path {path}: no such folder")
        if os.path.isfile(os.path.join(path, ".metadata")):
            keys = checkpoint_keys(path)
            wanted = ["model"] if self.cfg.initial_load_model_only else [k for k in STATE_KEYS if k in keys and k in self.states]
            logger.info(f"initial load from DCP {path} ({', '.join(wanted)})")
            self._dcp_load({k: self.states[k] for k in wanted}, path)
            return int(self.states["train_state"].step) if "train_state" in wanted else 0
        if any(f.endswith(".safetensors") for f in os.listdir(path)):
            from torchtitan.components.hf_checkpoint import load_hf_into_model

            if self.model_adapter is None:
                raise CheckpointError(f"checkpoint.initial_load_path {path} is an HF folder but this model has no HF adapter")
            logger.info(f"initial load from HF safetensors {path}")
            load_hf_into_model(self.states["model"], self.model_adapter, path)
            return 0
        raise CheckpointError(f"checkpoint.initial_load_path {path} holds neither a DCP checkpoint (.metadata) "
                              f"nor HF *.safetensors files")

    def _dcp_load(self, state: dict, path: str) -> None:
        try:
            dcp.load(state, checkpoint_id=path)
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()
            detail = next((line for line in msg if "size" in line.lower() or "shape" in line.lower() or "missing" in line.lower()),
                          msg[0] if msg else type(e).__name__)
            raise CheckpointError(f"checkpoint {path} does not fit this model/run: {detail.strip()[:400]}") from None

    # ----------------------------------------------------------------- saving
    def should_save(self, step: int, last: bool = False) -> bool:
        if not self.enabled:
            return False
        if last:
            return True
        if step == 1 and self.cfg.enable_first_step_checkpoint:
            return True
        if self.cfg.interval_type == "steps":
            return step % self.cfg.interval == 0
        due = time.monotonic() - self._last_save_time >= self.cfg.interval
        if dist.is_initialized():
            # Ranks must agree, or some would enter the collective save and others not.
            flag = torch.tensor(int(due))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._async_pg or None)
            due = bool(flag.item())
        return due

    def save(self, step: int, last: bool = False) -> None:
        self.finish_pending()
        path = os.path.join(self.root, f"step-{step}")
        if last and self.cfg.last_save_model_only:
            state, kind = self._export_state(), "export"
        else:
            state, kind = {k: v for k, v in self.states.items()}, "full"
        if _rank() == 0:
            if os.path.isdir(path):
                if os.path.isfile(os.path.join(path, MARKER)):
                    raise CheckpointError(f"{path} already holds a complete checkpoint; refusing to overwrite it")
                shutil.rmtree(path)  # an interrupted save of the same step: nothing usable is lost
            os.makedirs(path, exist_ok=True)
        _barrier()
        info = {"step": step, "kind": kind, "time": time.time(),
                "world_size": dist.get_world_size() if dist.is_initialized() else 1}
        if kind == "export":
            info["dtype"] = self.cfg.export_dtype
        t0 = time.perf_counter()
        if self.cfg.async_mode != "disabled" and not last:
            fut = self._async_save(state, path)
            self._pending = (fut, path, step, info)
            logger.info(f"checkpoint step-{step}: async save started, training blocked {time.perf_counter() - t0:.3f}s")
        else:
            dcp.save(state, checkpoint_id=path)
            self._complete(path, step, info)
            logger.info(f"checkpoint step-{step} saved ({kind}) in {time.perf_counter() - t0:.3f}s")
        self._last_save_time = time.monotonic()

    def _async_save(self, state: dict, path: str) -> Future:
        kwargs = {"checkpoint_id": path, "process_group": self._async_pg}
        if self.cfg.async_mode == "async_with_pinned_mem" and torch.cuda.is_available():
            try:
                from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

                kwargs["async_stager"] = DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False,
                                                                      use_async_staging=True, use_non_blocking_copy=True))
            except ImportError:
                logger.warning("this torch has no DCP DefaultStager; async_with_pinned_mem falls back to plain async")
        result = dcp.async_save(state, **kwargs)
        # Newer torch returns an AsyncSaveResponse holding the upload future.
        return getattr(result, "upload_completion", result)

    def finish_pending(self) -> None:
        if self._pending is None:
            return
        fut, path, step, info = self._pending
        fut.result()
        self._pending = None
        self._complete(path, step, info)

    def _complete(self, path: str, step: int, info: dict) -> None:
        _barrier()
        if _rank() == 0:
            tmp = os.path.join(path, MARKER + ".tmp")
            with open(tmp, "w") as f:
                json.dump(info, f)
            os.replace(tmp, os.path.join(path, MARKER))
            self._purge()
        _barrier()

    def _purge(self) -> None:
        if self.cfg.keep_latest_k <= 0:
            return
        complete = [(s, p) for s, p, c in step_folders(self.root) if c]
        keep = {p for _, p in complete[-self.cfg.keep_latest_k:]}
        newest = complete[-1][1] if complete else None
        for _, p in complete:
            if p not in keep and p != newest and p != self.loaded_path and not p.endswith("step-0"):
                logger.info(f"keep_latest_k={self.cfg.keep_latest_k}: removing {p}")
                shutil.rmtree(p, ignore_errors=True)
        if self.loaded_path and self.loaded_path not in keep and any(s > 0 for s, _ in complete[-self.cfg.keep_latest_k:]):
            self.loaded_path = None  # newer complete checkpoints exist: the loaded one may go next time

    def _export_state(self) -> dict:
        """Weights only, cast to export_dtype whatever the training dtype (no silent float32 gate)."""
        dtype = EXPORT_DTYPES[self.cfg.export_dtype]
        sd = self.states["model"].state_dict()
        return {"model": {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in sd.items()}}

    def save_seed(self) -> None:
        """step-0 weights from a single-process init; any layout can start from them."""
        path = os.path.join(self.root, "step-0")
        if os.path.isfile(os.path.join(path, MARKER)):
            raise CheckpointError(f"{path} already holds a seed checkpoint; remove it or pick another job.dump_folder")
        os.makedirs(path, exist_ok=True)
        dcp.save({"model": self.states["model"]}, checkpoint_id=path)
        self._complete(path, 0, {"step": 0, "kind": "seed", "time": time.time(), "world_size": 1})
        logger.info(f"seed checkpoint written to {path}")

    def close(self) -> None:
        self.finish_pending()
