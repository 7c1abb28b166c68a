"""Reuse of freed host memory on CPU runs, where every step's activations and gradients live in it.

glibc's malloc hands blocks above its mmap threshold (at most 32 MiB) straight back to the kernel when they are
freed, and trims the top of the heap once enough of it is free. A training step frees and reallocates the same
activation sizes every step, so each step then touches fresh pages: on the OLMo 2 debug shape (seq 512 x batch 8)
about 42,000 page faults per step, each page zeroed by the kernel. Serving every block from the heap and never
trimming it lets the next step reuse the same pages (docs/performance.md has the measurement). The cost: the
process keeps its peak resident size until it exits. Other C libraries (musl, macOS) are left as they are.
"""
from __future__ import annotations

import ctypes
import logging
import platform

import torch

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_INT_MAX = 2 ** 31 - 1
logger = logging.getLogger("torchtitan")


def keep_freed_memory(device: torch.device, enabled: bool = True) -> bool:
    """On a CPU device, serve all allocations from the heap and keep what is freed there; True where applied
    (glibc). GPU runs keep glibc's defaults: their activations are not in host memory."""
    if not enabled or device.type != "cpu" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    applied = all(libc.mallopt(param, value) == 1 for param, value in
                  ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX), (_M_TOP_PAD, 64 << 20)))
    if applied:
        logger.info("host memory: freed blocks stay in the heap for the next step (training.cpu_keep_freed_memory)")
    return applied
