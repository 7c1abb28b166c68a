"""Freed host memory is reused, not faulted in afresh: counted in page faults, in a process of its own."""
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Touch a 64 MiB tensor, free it, and count the minor page faults of touching a 60 MiB one (smaller, so it fits in
# the freed block wherever that lies in the heap).
_SCRIPT = """
import resource, sys
import torch
from torchtitan.tools.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory(torch.device('cpu'))
torch.ones(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(15 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_gpu_devices_and_the_off_switch_leave_malloc_alone():
    import torch

    from torchtitan.tools.host_memory import keep_freed_memory

    assert not keep_freed_memory(torch.device("cuda", 0))
    assert not keep_freed_memory(torch.device("cpu"), enabled=False)


def test_a_freed_block_is_reused_without_page_faults():
    pages = (60 << 20) // 4096
    assert _faults("default") > pages * 0.9  # glibc's default: the freed block went back to the kernel
    assert _faults("keep") < pages * 0.05
