"""Host memory: release_host_memory returns freed C heap to the OS, reusing_host_buffers and
synchronous_cpu_dispatch keep a step's buffers mapped for the next. The kernel's counts (VmRSS,
minor page faults) are the truth."""
import ctypes
import os
import re
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from molfun_jax.training import release_host_memory, reusing_host_buffers, synchronous_cpu_dispatch
from tests.conftest import ROOT


def _rss_mib() -> float:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


GLIBC = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not all(hasattr(ctypes.CDLL(None), f) for f in ("malloc_trim", "mallopt")),
    reason="glibc malloc_trim / mallopt, /proc and the kernel's fault counts are Linux / glibc")


def _libc() -> ctypes.CDLL:
    """The C library with malloc / free typed for 64-bit pointers."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


@GLIBC
def test_release_host_memory_returns_freed_heap_pages_to_the_os():
    libc = _libc()
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


HEAP_REUSE_SCRIPT = textwrap.dedent("""
    import ctypes, resource
    from pathlib import Path
    from molfun_jax.training import reusing_host_buffers
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20

    def faults():  # this thread's minor faults writing a block malloc'ed after the same size was freed
        libc.free(libc.malloc(size))
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        n = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
        libc.free(p)
        return n

    def rss_mib():
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    before = faults()
    with reusing_host_buffers() as active:
        faults()  # first use maps the heap's pages once
        inside = faults()
        held = rss_mib()
    print("RESULT", active, before, inside, held - rss_mib(), faults(), size // resource.getpagesize())
""")


@GLIBC
def test_reusing_host_buffers_keeps_freed_large_blocks_mapped_and_restores_on_exit():
    """A 64 MiB block freed and malloc'ed again: outside the block glibc maps it fresh (a fault
    per page, the control), inside it the pages of the freed block are reused; after the block
    the heap's free pages go back to the OS and the defaults are back. In a fresh process: the
    heap's state (and glibc's sliding mmap threshold) after other tests in the same process would
    decide the counts."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", HEAP_REUSE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    active, *counts = proc.stdout.split("RESULT", 1)[1].split()
    before, inside, released, after, pages = map(float, counts)
    assert active == "True"
    assert before > 0.9 * pages  # glibc default: mmap, fresh pages
    assert inside < 0.05 * pages, f"{inside:.0f} of {pages:.0f} pages faulted in again inside the block"
    assert released > 48, "the freed 64 MiB stayed mapped after the block"
    assert after > 0.9 * pages  # defaults back


XLA_REUSE_SCRIPT = textwrap.dedent("""
    import resource, sys
    import jax, jax.numpy as jnp
    from molfun_jax.training import reusing_host_buffers, synchronous_cpu_dispatch
    if sys.argv[1] == "sync":
        assert synchronous_cpu_dispatch() is True
    f = jax.jit(lambda x: jnp.sum(jnp.sort(x * 2.0, axis=0) * x[::-1]))  # temporaries the size of x
    x = jnp.ones((2048, 4096), jnp.float32)  # 32 MiB
    compiled = f.lower(x).compile()
    temp_pages = compiled.memory_analysis().temp_size_in_bytes // resource.getpagesize()
    with reusing_host_buffers():
        for _ in range(2):
            compiled(x).block_until_ready()
        faults = []
        for _ in range(5):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            compiled(x).block_until_ready()
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print("RESULT", sorted(faults)[2] / temp_pages, temp_pages)  # the median run
""")


@GLIBC
@pytest.mark.parametrize("dispatch", ["sync", "async"])
def test_synchronous_cpu_dispatch_lets_xla_runs_reuse_their_temporary_buffer(dispatch):
    """An XLA:CPU computation with 64 MiB of temporaries, run again and again in a fresh process
    under `reusing_host_buffers`: with synchronous dispatch the runs reuse the pages (few faults
    in the median run); with JAX's default async dispatch (the control) every run faults them in
    again. The median, because on a loaded machine one run in a few faults its pages anyway."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", XLA_REUSE_SCRIPT, dispatch], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    share, temp_pages = map(float, proc.stdout.split("RESULT", 1)[1].split())
    assert temp_pages * resource.getpagesize() >= 48 << 20  # large blocks: glibc would mmap them
    if dispatch == "sync":
        assert share < 0.1, f"{share:.0%} of the temporaries' pages faulted in the median run"
    else:
        assert share > 0.5, f"only {share:.0%} of the temporaries' pages faulted in the median run under async dispatch"


def test_synchronous_cpu_dispatch_changes_nothing_once_jax_runs():
    jax.numpy.zeros(1).block_until_ready()  # the backend exists
    before = jax.config.read("jax_cpu_enable_async_dispatch")
    assert synchronous_cpu_dispatch() is False
    assert jax.config.read("jax_cpu_enable_async_dispatch") == before


def test_the_cli_dispatches_cpu_computations_synchronously():
    """train.py and predict.py join the run (`cli.launch.join`) before any other JAX use: in a
    fresh process that leaves JAX's CPU client synchronous."""
    code = ("import jax; from molfun_jax.cli.launch import join; assert join([]) is False; "
            "jax.numpy.ones(3).sum().block_until_ready(); "
            "print('ASYNC', jax.config.read('jax_cpu_enable_async_dispatch'))")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ASYNC False" in proc.stdout


def test_weights_read_from_disk_are_shared_with_the_cpu_device_not_copied(tmp_path):
    """Arrays restored by orbax come back 64-byte aligned with their values, so `replicate` on a
    CPU device uses their memory (the device buffer's address is the array's) instead of holding
    a second copy of the weights; a misaligned array is copied to an aligned one, equal values."""
    import numpy as np
    import orbax.checkpoint as ocp

    from molfun_jax.checkpoint import read_arrays
    from molfun_jax.training import data_mesh, replicate
    from molfun_jax.training.memory import align_host_arrays

    rng = np.random.default_rng(0)
    raw = np.zeros(4096 + 64, np.uint8)
    start = (16 - raw.ctypes.data) % 64  # 16-byte but not 64-byte aligned
    misaligned = raw[start:start + 4096].view(np.float32).reshape(32, 32)
    misaligned[...] = rng.standard_normal((32, 32))
    tree = {"a": {"kernel": misaligned, "bias": rng.standard_normal(7).astype(np.float32)},
            "b": rng.integers(0, 9, (3, 5)).astype(np.int32),
            "c": {f"w{i}": rng.standard_normal((5, i + 1)).astype(np.float32) for i in range(8)}}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "params", tree)
    want = {"kernel": misaligned.copy(), "b": tree["b"].copy()}
    assert align_host_arrays(tree) is tree and tree["a"]["kernel"].ctypes.data % 64 == 0
    np.testing.assert_array_equal(tree["a"]["kernel"], want["kernel"])

    got = read_arrays(tmp_path / "params")
    leaves = jax.tree_util.tree_leaves(got)  # orbax's own: about 1 in 4 aligned, by chance
    assert len(leaves) == 11 and all(x.ctypes.data % 64 == 0 for x in leaves)
    np.testing.assert_array_equal(got["a"]["kernel"], want["kernel"])
    np.testing.assert_array_equal(got["b"], want["b"])
    assert got["b"].dtype == np.int32
    mesh = data_mesh()
    if mesh.size == 1 and jax.default_backend() == "cpu":  # several devices hold a copy each
        on_device = replicate(got, mesh)
        assert on_device["a"]["kernel"].unsafe_buffer_pointer() == got["a"]["kernel"].ctypes.data


FLAG_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    x = np.linspace(-3, 3, 4096, dtype=np.float32).reshape(64, 64)
    y = jax.jit(lambda x: jnp.tanh(x - x.mean(-1, keepdims=True)) * jnp.exp(-x * x))(x)  # loop fusions
    x = x.astype(np.float64)
    want = np.tanh(x - x.mean(-1, keepdims=True)) * np.exp(-x * x)
    print(float(np.abs(np.asarray(y, np.float64) - want).max()))
""")


def test_the_readmes_low_memory_compile_flag_is_an_xla_cpu_option_that_changes_no_result():
    """README's `XLA_FLAGS=...` (a first run without the fusion emitters' compile transient) must
    name an option of this jaxlib's XLA:CPU: XLA aborts on an unknown one, as the invented flag
    shows; with it, a fused program still computes numpy's float64 values to float32 rounding."""
    flags = re.findall(r"XLA_FLAGS=(--\w+=\w+)", (ROOT / "README.md").read_text())
    assert len(flags) == 1, flags

    def run(flag: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
        return subprocess.run([sys.executable, "-c", FLAG_SCRIPT], env=env, capture_output=True, text=True,
                              cwd=ROOT, timeout=120)

    ok = run(flags[0])
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert float(ok.stdout.split()[-1]) < 1e-6
    unknown = run("--xla_cpu_no_such_option=false")
    assert unknown.returncode != 0 and "xla_cpu_no_such_option" in unknown.stderr
