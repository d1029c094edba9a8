"""release_host_memory returns freed C heap to the OS: the kernel's VmRSS is the truth."""
import ctypes
import sys
from pathlib import Path

import pytest

from molfun_jax.training import release_host_memory


def _rss_mib() -> float:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "malloc_trim"),
                    reason="glibc malloc_trim and /proc are Linux / glibc")
def test_release_host_memory_returns_freed_heap_pages_to_the_os():
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block, count = 64 << 10, 2048  # 128 MiB in blocks under the mmap threshold: they come from the heap
    ptrs = [libc.malloc(block) for _ in range(count)]
    for p in ptrs:
        ctypes.memset(p, 1, block)  # touch every page
    pin = libc.malloc(block)  # above the freed blocks, so free() cannot shrink the heap top
    for p in ptrs:
        libc.free(p)
    held = _rss_mib()
    assert release_host_memory() is True
    released = held - _rss_mib()
    libc.free(pin)
    assert released > 64, f"only {released:.0f} MiB of 128 MiB freed heap went back to the OS"
