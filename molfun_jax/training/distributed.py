"""Data parallelism over all devices of all processes: a 1-D device mesh with axis 'data';
the train step runs under `jax.shard_map` (each device takes a slice of the batch, gradients are
summed with `lax.psum`, the update runs replicated), i.e. pmap + pmean semantics on global arrays,
so the same code runs on one device, several local devices and several hosts."""
from __future__ import annotations

import itertools
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
SYNC_TIMEOUT_S = 1800  # how long a barrier waits for the slowest process (e.g. one still compiling)
_BARRIERS = itertools.count()  # the barriers this process has passed, in the order all processes do
# environment variables by which a cluster launcher announces a multi-process run
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> bool:
    """Start JAX's multi-host runtime (`jax.distributed.initialize`) when this is a multi-process
    run: explicit arguments, or a cluster launcher's environment (SLURM, Open MPI, TPU pods,
    `JAX_COORDINATOR_ADDRESS`). A no-op for a single process. Call before any other JAX call.
    Returns whether the distributed runtime was started."""
    explicit = coordinator_address is not None or num_processes is not None
    multi = explicit or (any(k in os.environ for k in _CLUSTER_ENV) and _env_processes() != 1)
    if not multi:
        return False
    # CPU devices of different processes talk through gloo (jax 0.10's default, said explicitly:
    # without cross-process CPU collectives the psum of a step fails); GPU / TPU ignore it
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # None arguments are filled by jax's cluster auto-detection (SLURM, Open MPI, TPU, env)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    # gloo builds its context at the first collective and gives up when a process is 30 s late
    # (not configurable); meet here first, at a barrier of the coordination service
    sync("molfun_joined")
    multihost_utils.sync_global_devices("molfun_gloo_ready")
    return True


def is_primary() -> bool:
    """Whether this is process 0, the one that writes reports, manifests and progress."""
    return jax.process_index() == 0


def sync(name: str, timeout_s: int = SYNC_TIMEOUT_S) -> None:
    """A barrier of all processes (a no-op for one process), e.g. before process 0 reads what
    every process has written. It waits at the coordination service (up to `timeout_s`), not in
    a device collective, so a process that is slow to get there is not an error."""
    if jax.process_count() > 1:
        key = f"{name}#{next(_BARRIERS)}"  # a barrier id serves once; every process counts alike
        ocp.multihost.get_barrier_sync_fn()(key=key, timeout_ms=timeout_s * 1000)


def held_whole(x: jax.Array) -> bool:
    """Whether this process holds the whole value of `x` (on its own devices, or replicated)."""
    return x.is_fully_addressable or x.is_fully_replicated


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a global array as numpy in every process (gathered from the other
    processes when it is spread over them)."""
    if held_whole(x):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _env_processes() -> Optional[int]:
    for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if k in os.environ:
            return int(os.environ[k])
    return None


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh ('data',) over `devices` (default: every device of every process)."""
    return Mesh(np.asarray(list(devices) if devices is not None else jax.devices()), (DATA_AXIS,))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put a pytree on every device of the mesh (the same value in every process)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: Any, mesh: Mesh, axis: int = 0) -> Any:
    """Global arrays of a host batch split along `axis` (the example axis) over the mesh. Every
    process passes the same global batch and contributes the shards of its own devices."""
    def put(x: np.ndarray) -> jax.Array:
        x = np.asarray(x)
        sharding = NamedSharding(mesh, P(*([None] * axis), DATA_AXIS))
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    return jax.tree_util.tree_map(put, batch)
