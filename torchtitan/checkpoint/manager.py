"""DCP checkpoints: save, resume the newest complete one, reshard, export weights, seed.

Layout: {dump_folder}/{folder}/step-N/ is a plain DCP checkpoint (stock
`torch.distributed.checkpoint` tools read it, e.g. `format_utils dcp_to_torch`)
plus a `.complete` marker that rank 0 writes only after every rank's data and
the DCP metadata are on disk. A folder without the marker (a save cut by a
crash or SIGKILL) is never loaded; it is overwritten when the run reaches that
step again. Top-level keys: model, optimizer, lr_scheduler, dataloader,
train_state; each is a Stateful, and DCP reshards DTensors on load, so a run
resumes on any number of processes. Folder helpers live in checkpoint/io.py, other
formats (HF, Meta, OLMo) in checkpoint/formats/.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from torchtitan.checkpoint.formats.hf import export_dcp_to_hf, load_hf_into_model
from torchtitan.checkpoint.io import (
    MARKER,
    ModelInfo,
    check_fits,
    dcp_error_detail,
    marker_info,
    model_shapes,
    read_dcp_metadata,
    read_marker,
    state_shapes,
    step_folders,
    top_level_keys,
    write_marker,
)
from torchtitan.config.job_config import Checkpoint as CheckpointConfig
from torchtitan.tools.dtypes import DTYPES
from torchtitan.tools.errors import CheckpointError

logger = logging.getLogger("torchtitan")

__all__ = ["CheckpointManager", "ModelWrapper", "STATE_KEYS"]

STATE_KEYS = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state", "spike_guard")
# Kinds of complete step folders (marker "kind"): full training state, or model weights only.
RESUMABLE_KINDS = ("full", "seed", "converted")


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

    def load_full_state_dict(self, state_dict: dict) -> None:
        """Full (unsharded) tensors on every rank, e.g. from HF safetensors; each part keeps its own slice."""
        for part in self.model_parts:
            own = set(get_model_state_dict(part))
            set_model_state_dict(part, {k: v for k, v in state_dict.items() if k in own},
                                 options=StateDictOptions(full_state_dict=True, strict=False))


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _stager_reusable(stager) -> bool:
    """Whether a DefaultStager can stage again. torch 2.11 closes its inner StateDictStager after every stage
    (a second save then fails on plain dicts); later releases keep it open so its CPU buffers are reused.
    Anything that does not look like an open stager is replaced, which is always correct."""
    inner = getattr(stager, "_state_dict_stager", None)
    return bool(getattr(inner, "_deepcopy_dispatch", None))


@dataclass
class _PendingSave:
    """An async save in flight: its marker is written once rank 0's upload future is done."""

    future: Future
    path: str
    info: dict
    marked: bool = False


class CheckpointManager:
    """What the training loop calls: load() once, should_save()/save() after each step, close() at the end.

    Every rank calls every method (DCP saves and loads are collective); rank 0 alone
    writes markers and deletes old folders, so the file system sees one writer.
    """

    def __init__(self, cfg: CheckpointConfig, dump_folder: str, states: dict[str, Stateful], total_steps: int,
                 model: ModelInfo | None = None):
        """model: recorded in every marker, and maps HF names for initial loads from HF safetensors."""
        self.cfg = cfg
        self.root = os.path.join(dump_folder, cfg.folder)
        self.states = states
        self.total_steps = total_steps
        self.model = model
        self.enabled = cfg.enable
        self.loaded_path: str | None = None
        self.checkpoint_lr: float | None = None  # the lr the initial_load_path run would have used next
        self._pending: _PendingSave | None = None
        self._async_pg = None
        self._stager = None
        self._last_save_time = time.monotonic()
        bad = sorted(set(cfg.exclude_from_loading) - set(STATE_KEYS))
        if bad:
            raise CheckpointError(f"checkpoint.exclude_from_loading: {', '.join(bad)} not among "
                                  f"{', '.join(STATE_KEYS)}")
        if self.enabled and cfg.async_mode != "disabled" and dist.is_initialized():
            # A separate gloo group: async DCP on the default group hangs while training uses it
            # (TORCH_ON_CPU.md), and NCCL-only default groups cannot run DCP's CPU collectives.
            self._async_pg = dist.new_group(backend="gloo")

    # ---------------------------------------------------------------- loading
    def load(self) -> int:
        """Resume this run's newest complete checkpoint (or load_step), else initial_load_path. Returns the step.

        With checkpointing off nothing is resumed or saved, but initial_load_path still loads: a run asked to
        start from given weights never silently starts from random ones."""
        if not self.enabled:
            return self._initial_load(self.cfg.initial_load_path) if self.cfg.initial_load_path else 0
        folders = step_folders(self.root)
        for f in folders:
            if not f.complete and (self.cfg.load_step < 0 or f.step == self.cfg.load_step):
                logger.warning(f"checkpoint {f.path} is incomplete (no {MARKER}: its save was interrupted); "
                               "skipping it")
        complete = [f for f in folders if f.complete]
        kinds = {f.path: read_marker(f.path).get("kind", "full") for f in complete}
        if self.cfg.load_step >= 0:
            match = [f for f in complete if f.step == self.cfg.load_step]
            if not match:
                have = ", ".join(str(f.step) for f in complete) or "none"
                raise CheckpointError(f"checkpoint.load_step = {self.cfg.load_step}: no complete checkpoint "
                                      f"{os.path.join(self.root, f'step-{self.cfg.load_step}')} (complete steps: "
                                      f"{have})")
            chosen = match[0]
        elif complete:
            chosen = complete[-1]
        elif self.cfg.initial_load_path:
            return self._initial_load(self.cfg.initial_load_path)
        else:
            return 0
        if kinds[chosen.path] == "export":
            return self._finished_run(chosen)
        self._refuse_overwrite_of_newer(chosen.step, complete)
        return self._load_folder(chosen.path, chosen.step)

    def stage_start_lr(self) -> float:
        """The lr the initial_load_path run would have used next (lr_scheduler.start_lr_from_checkpoint)."""
        if self.checkpoint_lr is None:
            raise CheckpointError(f"lr_scheduler.start_lr_from_checkpoint: checkpoint.initial_load_path "
                                  f"{self.cfg.initial_load_path} holds no optimizer state, so no lr (a weights-only "
                                  f"export or converted weights); load a full checkpoint, or set optimizer.lr")
        logger.info(f"lr schedule: peak lr {self.checkpoint_lr:.6g}, where {self.cfg.initial_load_path} stopped")
        return self.checkpoint_lr

    def _finished_run(self, export) -> int:
        if export.step >= self.total_steps:
            logger.info(f"{export.path} is the final weights-only export of this run (step {export.step} >= "
                        f"training.steps {self.total_steps}): nothing left to train")
            return export.step
        raise CheckpointError(
            f"{export.path} is the final weights-only export of a finished run, which cannot be resumed "
            f"(no optimizer or data state); to train further start a new job.dump_folder with "
            f"checkpoint.initial_load_path = {export.path}, or resume an earlier full checkpoint with "
            f"checkpoint.load_step in a copy of this folder")

    def _refuse_overwrite_of_newer(self, step: int, complete) -> None:
        """Resuming an older step would later collide with (or purge) newer complete checkpoints."""
        newer = [f.step for f in complete if step < f.step <= self.total_steps]
        if newer:
            raise CheckpointError(
                f"checkpoint.load_step = {step}, but {self.root} also holds newer complete checkpoints (steps "
                f"{', '.join(map(str, newer))}) that this run would overwrite; copy step-{step} into a new "
                f"checkpoint.folder (or job.dump_folder) and resume there")

    def _load_folder(self, path: str, step: int) -> int:
        meta = read_dcp_metadata(path)
        keys = top_level_keys(meta)
        if "model" not in keys:
            raise CheckpointError(f"checkpoint {path} has no model weights (keys: {', '.join(sorted(keys))})")
        wanted = [k for k in STATE_KEYS if k in keys and k in self.states and k not in self.cfg.exclude_from_loading]
        logger.info(f"loading checkpoint {path} ({', '.join(wanted)})")
        self._dcp_load(wanted, path, meta)
        self.loaded_path = path
        # Model-only folders (seed, converted) start training at step 0; a full checkpoint continues
        # at its step even when train_state is excluded, so later saves never collide with it.
        return step if "train_state" in keys else 0

    def _initial_load(self, path: str) -> int:
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint.initial_load_path {path}: no such folder")
        files = os.listdir(path)
        if any(f.endswith(".safetensors") for f in files) and ".metadata" not in files:
            if self.model is None:
                raise CheckpointError(f"checkpoint.initial_load_path {path} is an HF folder, but the checkpoint "
                                      f"manager was given no model to map HF names to")
            logger.info(f"initial load from HF safetensors {path}")
            load_hf_into_model(self.states["model"], self.model.spec.adapter(self.model.args), path)
            return 0
        steps = step_folders(path)
        if steps and ".metadata" not in files:
            newest = [f.path for f in steps if f.complete]
            raise CheckpointError(f"checkpoint.initial_load_path {path} is a folder of step checkpoints, not one "
                                  f"checkpoint; point it at a step folder" + (f", e.g. {newest[-1]}" if newest else ""))
        meta = read_dcp_metadata(path)
        keys = top_level_keys(meta)
        self.checkpoint_lr = _saved_lr(path, meta)
        if self.cfg.reset_trainer_state:
            # A new stage: weights and optimizer moments; step, data position and lr schedule start afresh.
            wanted = ["model"] + [k for k in ("optimizer",) if k in keys and k in self.states]
            if "optimizer" not in wanted:
                logger.warning(f"checkpoint.reset_trainer_state: {path} holds no optimizer state; the moments "
                               f"start at zero")
        elif self.cfg.initial_load_model_only:
            wanted = ["model"]
        else:
            wanted = [k for k in STATE_KEYS
                      if k in keys and k in self.states and k not in self.cfg.exclude_from_loading]
        if "model" not in keys:
            raise CheckpointError(f"checkpoint.initial_load_path {path} has no model weights "
                                  f"(keys: {', '.join(sorted(keys))})")
        logger.info(f"initial load from DCP {path} ({', '.join(wanted)})"
                    + (", trainer state reset" if self.cfg.reset_trainer_state else ""))
        hyper = _hyperparameters(self.states.get("optimizer"))
        self._dcp_load(wanted, path, meta)
        if "optimizer" in wanted and self.cfg.reset_trainer_state:
            _restore_hyperparameters(self.states["optimizer"], hyper)  # this stage's lr, betas, weight decay
        schedule = self.states.get("lr_scheduler")
        if getattr(schedule, "peak_from_checkpoint", False) and "lr_scheduler" not in wanted:
            schedule.set_peak(self.stage_start_lr())  # a new stage starts where the loaded run stopped
        return int(self.states["train_state"].step) if "train_state" in wanted else 0

    def _dcp_load(self, wanted: list[str], path: str, meta) -> None:
        model = self.states["model"]
        check_fits(path, model_shapes(meta), state_shapes(model.state_dict()), what="checkpoint")
        try:
            dcp.load({k: self.states[k] for k in wanted}, checkpoint_id=path)
            for k in wanted:  # states that depend on others loaded after them (dcp.load goes in key order)
                getattr(self.states[k], "after_load", lambda: None)()
        except CheckpointError:
            raise
        except BaseException as e:  # noqa: BLE001 - DCP raises CheckpointException, a BaseException
            if isinstance(e, KeyboardInterrupt):
                raise
            raise CheckpointError(f"checkpoint {path} could not be loaded ({', '.join(wanted)}): "
                                  f"{dcp_error_detail(e)}") from None

    # ----------------------------------------------------------------- saving
    def should_save(self, step: int, last: bool = False) -> bool:
        """Whether to save after this step; also completes a finished async save (called every step)."""
        if not self.enabled:
            return False
        self._poll_pending()
        if last:
            return True
        if step == 1 and self.cfg.enable_first_step_checkpoint:
            return True
        if self.cfg.interval_type == "steps":
            return step % self.cfg.interval == 0
        due = time.monotonic() - self._last_save_time >= self.cfg.interval
        if dist.is_initialized():
            # Ranks must agree, or some would enter the collective save and others not. The default
            # group: the async group may be busy with a background save in another thread.
            # (A host sync each step, the price of a wall-clock interval.)
            flag = torch.tensor(int(due), device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            due = bool(flag.item())
        return due

    def save(self, step: int, last: bool = False) -> None:
        self.finish_pending()
        path = os.path.join(self.root, f"step-{step}")
        if last and self.cfg.last_save_model_only:
            state, kind = self._export_state(), "export"
        else:
            state, kind = dict(self.states), "full"
        self._prepare_folder(path)
        info = marker_info(step, kind, self.model, **({"dtype": self.cfg.export_dtype} if kind == "export" else {}))
        t0 = time.perf_counter()
        if self.cfg.async_mode != "disabled" and not last:
            self._pending = _PendingSave(self._async_save(state, path), path, info)
            logger.info(f"checkpoint step-{step}: async save started, training blocked {time.perf_counter() - t0:.3f}s")
        else:
            dcp.save(state, checkpoint_id=path)
            self._complete(path, info)
            logger.info(f"checkpoint step-{step} saved ({kind}) in {time.perf_counter() - t0:.3f}s, "
                        f"training blocked for all of it")
        if last and self.cfg.last_save_in_hf:
            self._export_hf(path)
        self._last_save_time = time.monotonic()

    def _export_hf(self, path: str) -> None:
        """The final weights as an HF folder beside the step folder, converted by rank 0 from the DCP save just
        completed, one block at a time. The other ranks do not wait (a large model takes a while)."""
        if _rank() != 0:
            return
        if self.model is None:
            raise CheckpointError("checkpoint.last_save_in_hf: the checkpoint manager was given no model to name "
                                  "the HF tensors")
        t0 = time.perf_counter()
        out = f"{path}-hf"
        count, dtype = export_dcp_to_hf(path, out, self.model, DTYPES[self.cfg.export_dtype])
        logger.info(f"HF export {out}: {count} tensors in {dtype}, {time.perf_counter() - t0:.1f}s")

    def _prepare_folder(self, path: str) -> None:
        if _rank() == 0:
            if os.path.isdir(path):
                if os.path.isfile(os.path.join(path, MARKER)):
                    raise CheckpointError(f"{path} already holds a complete checkpoint; refusing to overwrite it")
                shutil.rmtree(path)  # an interrupted save of this same step: nothing usable is lost
            os.makedirs(path)
        _barrier()

    def _async_save(self, state: dict, path: str) -> Future:
        stager = self._get_stager()
        result = dcp.async_save(state, checkpoint_id=path, process_group=self._async_pg, async_stager=stager)
        if not _stager_reusable(stager):
            self._stager = None
        # Newer torch returns an AsyncSaveResponse holding the upload future.
        return getattr(result, "upload_completion", result)

    def _get_stager(self) -> DefaultStager:
        """One stager for the whole run: its CPU (or pinned) buffers are reused by every save."""
        if self._stager is None:
            pinned = self.cfg.async_mode == "async_with_pinned_mem" and torch.cuda.is_available()
            if self.cfg.async_mode == "async_with_pinned_mem" and not pinned:
                logger.info("checkpoint.async_mode = async_with_pinned_mem: no CUDA device, "
                            "staging in plain CPU memory")
            # Staging is synchronous (training waits for the device-to-host copy, not for the write):
            # the optimizer step after a save must not change weights that are still being copied.
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=pinned, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=False))
        return self._stager

    def _poll_pending(self) -> None:
        """Write the marker as soon as the background write is done, without blocking or collectives.

        DCP's coordinator (rank 0) returns only after gathering every rank's write
        results and writing .metadata, so rank 0's future being done means the whole
        checkpoint is on disk; rank 0 alone writes the marker and no rank waits.
        """
        p = self._pending
        if p is not None and not p.marked and p.future.done():
            self._mark_async(p)

    def finish_pending(self) -> None:
        """Wait for an async save (before the next save, and at the end of training)."""
        p = self._pending
        if p is None:
            return
        self._pending = None
        if not p.marked:
            self._mark_async(p)

    def _mark_async(self, p: _PendingSave) -> None:
        try:
            p.future.result()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"async save of {p.path} failed: {type(e).__name__}: {e}") from e
        p.marked = True
        if _rank() == 0:
            write_marker(p.path, p.info)
            self._purge()
            logger.info(f"checkpoint {p.path} complete (async write finished)")

    def _complete(self, path: str, info: dict) -> None:
        _barrier()
        if _rank() == 0:
            write_marker(path, info)
            self._purge()
        _barrier()

    def _purge(self) -> None:
        """keep_latest_k over full checkpoints. Never deleted: the newest full one (so the run
        stays resumable even after a weights-only final export), seeds, converted folders,
        final exports and incomplete folders."""
        if self.cfg.keep_latest_k <= 0:
            return
        full = [f for f in step_folders(self.root) if f.complete and read_marker(f.path).get("kind", "full") == "full"]
        for f in full[:-self.cfg.keep_latest_k]:
            logger.info(f"keep_latest_k={self.cfg.keep_latest_k}: removing {f.path}")
            shutil.rmtree(f.path, ignore_errors=True)

    def _export_state(self) -> dict:
        """Weights only, cast to export_dtype whatever the training dtype (no silent float32 gate)."""
        dtype = DTYPES[self.cfg.export_dtype]
        sd = self.states["model"].state_dict()
        return {"model": {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in sd.items()}}

    def save_seed(self) -> None:
        """step-0 weights from a single-process init; any layout can start from them."""
        path = os.path.join(self.root, "step-0")
        existing = [f.path for f in step_folders(self.root) if f.complete]
        if existing:
            raise CheckpointError(f"{self.root} already holds checkpoints ({', '.join(existing)}); a seed checkpoint "
                                  f"starts a run: pick a new job.dump_folder or checkpoint.folder")
        self._prepare_folder(path)
        dcp.save({"model": self.states["model"]}, checkpoint_id=path)
        self._complete(path, marker_info(0, "seed", self.model))
        logger.info(f"seed checkpoint written to {path}")

    def close(self) -> None:
        self.finish_pending()
        if self._stager is not None:
            self._stager.close()
            self._stager = None


def _hyperparameters(optimizers) -> list[list[dict]] | None:
    """Each param group's settings (everything but its params), to keep this run's over a loaded checkpoint's."""
    if optimizers is None:
        return None
    return [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in optimizers.optimizers]


def _restore_hyperparameters(optimizers, saved: list[list[dict]] | None) -> None:
    for opt, groups in zip(optimizers.optimizers, saved or []):
        for group, values in zip(opt.param_groups, groups):
            group.update(values)


def _saved_lr(path: str, meta) -> float | None:
    """The learning rate stored with a checkpoint's optimizer (set for the step after the saved one), read alone."""
    key = next((k for k in meta.state_dict_metadata if k.startswith("optimizer.param_groups.") and
                k.endswith(".lr")), None)
    if key is None:
        return None
    state = {"optimizer": {key.removeprefix("optimizer."): 0.0}}
    dcp.load(state, checkpoint_id=path)
    return float(next(iter(state["optimizer"].values())))

