"""The one place the device type is decided: CUDA when present, else CPU (gloo)."""
from __future__ import annotations

import os

import torch


def detect_device_type() -> str:
    if os.environ.get("TORCHTITAN_FORCE_CPU") == "1":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_device(device_type: str) -> torch.device:
    if device_type == "cuda":
        idx = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"
