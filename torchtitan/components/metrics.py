"""One human line per logged step; the same values to metrics.jsonl, TensorBoard and Weights & Biases."""
from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import dataclass

import torch

from torchtitan.components.wandb_logger import open_wandb_run
from torchtitan.config.job_config import Metrics as MetricsConfig

logger = logging.getLogger("torchtitan")

# Dense bf16 peak TFLOP/s per device, the basis of MFU (torchtitan uses the same figures).
PEAK_BF16_TFLOPS = {
    "A100": 312.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "B200": 2250.0,
    "MI300X": 1307.0,
    "MI325X": 1307.0,
}


def peak_tflops(device_type: str) -> float | None:
    """None where MFU has no meaningful basis (CPU, unknown GPUs)."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    if "H100" in name and ("PCIe" in name or "PCIE" in name):
        return PEAK_BF16_TFLOPS["H100 PCIe"]
    if "H100" in name and "NVL" in name:
        return PEAK_BF16_TFLOPS["H100 NVL"]
    for key in ("H200", "H100", "B200", "A100", "MI325X", "MI300X"):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def peak_memory_gib(device_type: str) -> float:
    if device_type == "cuda":
        return torch.cuda.max_memory_reserved() / 2**30
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@dataclass
class StepTiming:
    data_seconds: float = 0.0
    steps: int = 0
    start: float = 0.0


class MetricsLogger:
    def __init__(self, cfg: MetricsConfig, dump_folder: str, rank: int, device_type: str, flops_per_token: float,
                 world_size: int, total_steps: int, write_files: bool, run_config: dict | None = None):
        """run_config: the resolved job config as a nested dict, stored with the W&B run."""
        self.cfg, self.device_type = cfg, device_type
        self.flops_per_token, self.world_size, self.total_steps = flops_per_token, world_size, total_steps
        self.peak = peak_tflops(device_type)
        self.window = StepTiming(start=time.perf_counter())
        self.tokens_since_log = 0
        self.jsonl = None
        self.tb = None
        self.wandb = None
        if write_files:
            os.makedirs(dump_folder, exist_ok=True)
            if cfg.enable_jsonl:
                self.jsonl = open(os.path.join(dump_folder, "metrics.jsonl"), "a", buffering=1)
            if cfg.enable_tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(dump_folder, cfg.save_tb_folder))
            if cfg.enable_wandb:
                self.wandb = open_wandb_run(cfg, dump_folder, run_config)
        self._t0 = time.perf_counter()

    def add_data_time(self, seconds: float) -> None:
        self.window.data_seconds += seconds

    def add_step(self, global_tokens: int) -> None:
        self.window.steps += 1
        self.tokens_since_log += global_tokens

    def should_log(self, step: int) -> bool:
        return step == 1 or step % self.cfg.log_freq == 0 or step == self.total_steps

    def log(self, step: int, loss: float, grad_norm: float, lr: float, extra: dict | None = None) -> dict:
        now = time.perf_counter()
        dt = max(now - self.window.start, 1e-9)
        tps = self.tokens_since_log / self.world_size / dt  # per device
        tflops = tps * self.flops_per_token / 1e12
        mfu = 100.0 * tflops / self.peak if self.peak else None
        step_time = dt / max(self.window.steps, 1)
        eta = (self.total_steps - step) * step_time
        rec = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "tps": tps, "tflops": tflops,
               "mfu": mfu, "memory_gib": peak_memory_gib(self.device_type),
               "data_wait_pct": 100.0 * self.window.data_seconds / dt, "step_time_s": step_time, "eta_s": eta}
        if extra:
            rec.update(extra)
        mfu_s = f"{mfu:.1f}%" if mfu is not None else "n/a"
        logger.info(
            f"step {step:>6d}  loss {loss:8.4f}  grad_norm {grad_norm:8.4f}  lr {lr:.3e}  tps {tps:,.0f}  "
            f"tflops {tflops:.2f}  mfu {mfu_s}  mem {rec['memory_gib']:.2f}GiB  data {rec['data_wait_pct']:.1f}%  "
            f"eta {_fmt_eta(eta)}" + "".join(f"  {k.replace('_', ' ')} {_fmt_value(v)}"
                                             for k, v in (extra or {}).items() if not k.startswith("data/"))
            + _shares(extra or {}))
        if self.jsonl:
            self.jsonl.write(json.dumps(rec) + "\n")
        # A mixture's data/<source>/share and data/<source>/tokens keep their names; the rest are train/<key>.
        self._scalars({(k if k.startswith("data/") else f"train/{k}"): v for k, v in rec.items()
                       if k != "step" and v is not None}, step)
        self.window = StepTiming(start=time.perf_counter())
        self.tokens_since_log = 0
        return rec

    def log_validation(self, step: int, loss: float, perplexity: float, tokens: int, seconds: float,
                       name: str = "") -> dict:
        """One line and one record for a validation set: loss per labelled token and perplexity. A named set
        (validation.sets) adds "validation_set" to its record and its name to the line and the scalars."""
        rec = {"step": step, **({"validation_set": name} if name else {}), "validation_loss": loss,
               "validation_ppl": perplexity, "validation_tokens": tokens, "validation_seconds": seconds}
        logger.info(f"validate {step:>5d}  {name + '  ' if name else ''}loss {loss:8.4f}  ppl {perplexity:10.3f}  "
                    f"tokens {tokens:,}  time {seconds:.1f}s")
        if self.jsonl:
            self.jsonl.write(json.dumps(rec) + "\n")
        prefix = f"validation/{name}" if name else "validation"
        self._scalars({f"{prefix}/loss": loss, f"{prefix}/ppl": perplexity}, step)
        self.window.start += seconds  # training throughput leaves validation time out
        return rec

    def log_downstream(self, step: int, results: dict[str, dict[str, float]], metric_types: dict[str, str],
                       documents: int, seconds: float) -> dict:
        """A header and one line per task (its reported metric, CE loss and bits per byte where the task has them),
        one record with every key ICLMetric returned (downstream/<task>/<key>, as TensorBoard's scalars)."""
        flat = {f"downstream/{label}/{k}": v for label, values in results.items() for k, v in values.items()}
        rec = {"step": step, **flat, "downstream_documents": documents, "downstream_seconds": seconds}
        width = max(len(label) for label in results)
        lines = [f"downstream {step:>5d}  {len(results)} tasks  {documents:,} documents  time {seconds:.1f}s"]
        for label, values in results.items():
            primary = f"{metric_types[label]}_v1"
            extra = "".join(f"  {k} {values[k]:.4f}" for k in ("ce_loss_v1", "bpb_v1") if k in values and k != primary)
            lines.append(f"  {label:<{width}}  {primary} {values[primary]:.4f}{extra}")
        logger.info("\n".join(lines))
        if self.jsonl:
            self.jsonl.write(json.dumps(rec) + "\n")
        self._scalars(flat, step)
        self.window.start += seconds  # training throughput leaves evaluation time out
        return rec

    def _scalars(self, scalars: dict, step: int) -> None:
        """The same named scalars to TensorBoard and W&B, at the training step (W&B's x axis too)."""
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()  # flushes the run file (offline) or the upload (online)
            self.wandb = None


def _fmt_value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _shares(extra: dict) -> str:
    """A mixture's per-source shares on the step line: `  data web 0.600 code 0.300`."""
    shares = [(k.split("/")[1], v) for k, v in extra.items() if k.startswith("data/") and k.endswith("/share")]
    return "  data " + " ".join(f"{name} {v:.3f}" for name, v in shares) if shares else ""


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"
