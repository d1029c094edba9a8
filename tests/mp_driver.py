"""Start the processes of one multi-process run of a script on localhost (jax.distributed over a
free port), with a timeout; every process is killed when one fails or time runs out."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

from tests.conftest import ROOT


def free_port() -> int:
    """A TCP port nobody listens on now (bind port 0, let the OS choose)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env(cache: Path, devices: int = 1, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a CPU run with `devices` host devices; launcher variables are removed so
    a 1-process run stays one process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "XLA_FLAGS")}
    env.update({"MOLFUN_JAX_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **(extra or {})})
    return env


def run_processes(script: Path, args: Sequence[str], n: int, cache: Path, devices: int = 1,
                  timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """`script args` as `n` processes of one jax.distributed run (`n` = 1: a plain run). Returns
    each process's result (rank order); raises AssertionError naming the rank that failed (the
    others are killed at once rather than left waiting for it)."""
    port = free_port()
    procs, logs = [], []
    try:
        for rank in range(n):
            launch = ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(n),
                      "--process-id", str(rank)] if n > 1 else []
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            logs.append((out, err))
            procs.append(subprocess.Popen([sys.executable, str(script), *args, *launch], cwd=ROOT,
                                          env=script_env(cache, devices), stdout=out, stderr=err, text=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        results = []
        for rank, (p, (out, err)) in enumerate(zip(procs, logs)):
            if p.poll() is None:
                p.kill()
                p.wait()
            out.seek(0)
            err.seek(0)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read()))
        failed = [rank for rank, r in enumerate(results) if r.returncode != 0]
        assert not failed, "\n".join(f"rank {rank} of {n} exited {r.returncode}:\n{r.stdout}\n{r.stderr[-3000:]}"
                                      for rank, r in enumerate(results))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for out, err in logs:
            out.close()
            err.close()
