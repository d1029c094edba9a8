"""Host memory: one copy of the weights, the C heap that XLA's compiler freed handed back to the
operating system, and the pages of the train step's buffers kept mapped from one step to the next.

XLA:CPU takes a numpy array onto the device in place when its data is 64-byte aligned and copies
it otherwise (measured, jax 0.10: 64-byte aligned arrays shared, 16-byte aligned ones copied).
Arrays restored by orbax are mostly not (253 of model_1_ptm's 338), so the run held the trunk
twice, the caller's numpy tree and the device copy (0.35 GiB, fp32); `align_host_arrays` fixes
that where weights are read (`checkpoint.read_arrays`).

Compiling the train step (LLVM, on every backend's host side) allocates several hundred MB in
small blocks and frees them; glibc keeps freed heap pages mapped, so a process would hold them
for the whole run (measured: 48-block model_1_ptm LoRA step, 1.35 GiB after compiling, 0.88 GiB
after the release; `scripts/bench_train_step.py`).

The opposite holds for the steps themselves on CPU. XLA:CPU allocates an executable's whole
temporary buffer on every run and frees it at the end; glibc serves a block that large with a
fresh `mmap` and unmaps it on `free`, so each step faults every page in again, zero-filled by the
kernel (48 blocks, N=64, fp32: 1.6 M faults and ~6 s of system time a step without remat, 72 K
with it). `synchronous_cpu_dispatch` + `reusing_host_buffers` make the step reuse those pages.

Not used, measured: XLA:CPU's older loop emitter (`xla_cpu_use_fusion_emitters=False`) compiles
in 0.13-0.35 GiB less, but slows a step that back-propagates through the Evoformer by 10-30 %
(LoRA, N=64), and a `jax.jit` given compiler options can no longer be traced inside another.
"""
from __future__ import annotations

import contextlib
import ctypes
from typing import Any, Iterator

import numpy as np

HOST_ALIGNMENT = 64  # bytes: XLA:CPU shares a numpy array's memory at this alignment

# glibc <malloc.h> mallopt parameters, and their defaults (mallopt(3))
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _libc_call(name: str):
    """The C library's function `name`, or None (macOS, musl: no glibc malloc tuning)."""
    return getattr(ctypes.CDLL(None), name, None)


def align_host_arrays(tree: dict[str, Any]) -> dict[str, Any]:
    """Make every numpy array of a nested dict `HOST_ALIGNMENT`-byte aligned, in place (an
    unaligned one is replaced by an aligned copy, equal values and dtype; its old buffer is freed
    as soon as nothing else holds it, so loading never holds two copies of the whole tree).
    Returns `tree`. On CPU, `replicate` of the result then shares the arrays' memory."""
    for key, value in tree.items():
        if isinstance(value, dict):
            align_host_arrays(value)
        elif isinstance(value, np.ndarray) and value.size and value.ctypes.data % HOST_ALIGNMENT:
            raw = np.empty(value.nbytes + HOST_ALIGNMENT, np.uint8)
            start = -raw.ctypes.data % HOST_ALIGNMENT
            aligned = raw[start:start + value.nbytes].view(value.dtype).reshape(value.shape)
            aligned[...] = value
            tree[key] = aligned
    return tree


def release_host_memory() -> bool:
    """Return the C heap's free pages to the OS (glibc `malloc_trim(0)`, which also releases
    free pages inside the heap). False, doing nothing, where the C library has no such call
    (macOS, musl)."""
    trim = _libc_call("malloc_trim")
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


@contextlib.contextmanager
def reusing_host_buffers() -> Iterator[bool]:
    """Within the block, glibc serves large blocks from the heap instead of `mmap` and never
    shrinks the heap on `free`, so a buffer freed by one step is reused, pages already mapped, by
    the next (`release_host_memory` still returns free pages when called). On exit glibc's
    defaults come back (fixed thresholds: glibc's sliding mmap threshold stays off once set) and
    the free pages go back to the OS. Yields False, changing nothing, without glibc `mallopt`.

    It reaches the blocks malloc'ed by the main thread (glibc's main arena; other threads' arenas
    map large blocks whatever the setting): an XLA:CPU executable's buffers once
    `synchronous_cpu_dispatch` runs it on the calling thread.
    """
    mallopt = _libc_call("mallopt")
    if mallopt is None:
        yield False
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, -1)  # -1 is SIZE_MAX to glibc: never trim
    try:
        yield True
    finally:
        mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        release_host_memory()


def synchronous_cpu_dispatch() -> bool:
    """Run CPU computations on the calling thread (`jax_cpu_enable_async_dispatch` off), so the
    buffers XLA:CPU allocates come from the heap that `reusing_host_buffers` keeps mapped. JAX
    reads the flag when it creates its backends: call this before any other JAX use. Returns
    whether it took effect (False, changing nothing, once a backend exists). GPU and TPU
    computations are not affected."""
    import jax
    from jax._src import xla_bridge  # no public way to ask whether the backends exist yet

    if xla_bridge.backends_are_initialized():
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True
