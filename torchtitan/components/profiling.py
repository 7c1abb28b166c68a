"""torch.profiler traces every `profile_freq` steps and CUDA memory snapshots, under the dump folder."""
from __future__ import annotations

import contextlib
import logging
import os
import pickle

import torch

from torchtitan.config.job_config import Profiling

logger = logging.getLogger("torchtitan")


class Profiler:
    """Call `.step(step)` once per training step; a no-op when profiling is off."""

    def __init__(self, cfg: Profiling, dump_folder: str, rank: int, device_type: str, start_step: int):
        self.cfg, self.rank, self.device_type = cfg, rank, device_type
        self.trace_dir = os.path.join(dump_folder, cfg.save_traces_folder)
        self.snapshot_dir = os.path.join(dump_folder, cfg.save_memory_snapshot_folder)
        self.prof = None
        self.snapshot = cfg.enable_memory_snapshot and device_type == "cuda"
        if cfg.enable_memory_snapshot and device_type != "cuda":
            logger.warning("profiling.enable_memory_snapshot records the CUDA allocator; nothing to record on CPU")
        if cfg.enable_profiling:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device_type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            freq, active = cfg.profile_freq, cfg.profiler_active
            warmup = min(cfg.profiler_warmup, freq - active)  # trainer/checks.py: active <= profile_freq
            # Trace the last `active` steps of each window of profile_freq steps, after `warmup` warm-up steps.
            schedule = torch.profiler.schedule(wait=freq - active - warmup, warmup=warmup, active=active)
            self.prof = torch.profiler.profile(activities=activities, schedule=schedule,
                                               on_trace_ready=self._save_trace, record_shapes=True)
            self.prof.start()
            # Align the schedule with global step numbers after a resume.
            for _ in range(start_step % freq):
                self.prof.step()
        if self.snapshot:
            torch.cuda.memory._record_memory_history(max_entries=100000)
        self._step = start_step

    def _save_trace(self, prof) -> None:
        folder = os.path.join(self.trace_dir, f"iteration_{self._step}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"rank{self.rank}_trace.json")
        prof.export_chrome_trace(path)
        logger.info(f"profiler trace written to {path}")

    def step(self, step: int) -> None:
        self._step = step
        if self.prof is not None:
            self.prof.step()
        if self.snapshot and step % self.cfg.profile_freq == 0:
            folder = os.path.join(self.snapshot_dir, f"iteration_{step}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"rank{self.rank}_memory_snapshot.pickle"), "wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)

    def close(self) -> None:
        if self.prof is not None:
            with contextlib.suppress(Exception):
                self.prof.stop()
        if self.snapshot:
            torch.cuda.memory._record_memory_history(enabled=None)
