"""Host memory: hand the C heap that XLA's compiler freed back to the operating system.

Compiling the train step (LLVM, on every backend's host side) allocates several hundred MB in
small blocks and frees them; glibc keeps freed heap pages mapped, so a process would hold them
for the whole run (measured: 48-block model_1_ptm LoRA step, 1.35 GiB after compiling, 0.88 GiB
after the release; `scripts/bench_train_step.py`).
"""
from __future__ import annotations

import ctypes


def release_host_memory() -> bool:
    """Return the C heap's free pages to the OS (glibc `malloc_trim(0)`, which also releases
    free pages inside the heap). False, doing nothing, where the C library has no such call
    (macOS, musl)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
