"""Joining a multi-process run (JAX's distributed runtime): the launch flags that train.py and
predict.py share, read before any other JAX use, and the quiet of processes other than 0. The
other process-wide setting made before JAX starts lives here too: synchronous CPU dispatch."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from molfun_jax.cli.common import build_parser, flag

LAUNCH_GROUP = "multi-process (jax.distributed; default: SLURM / Open MPI / JAX_COORDINATOR_ADDRESS)"
LAUNCH_FLAGS = [
    flag("--coordinator-address", group=LAUNCH_GROUP, default=None, metavar="HOST:PORT",
         help="process 0's address, the same for every process"),
    flag("--num-processes", group=LAUNCH_GROUP, type=int, default=None, metavar="N",
         help="processes in the run"),
    flag("--process-id", group=LAUNCH_GROUP, type=int, default=None, metavar="I",
         help="this process's rank, 0..N-1"),
]
LAUNCH_DESTS = tuple(f.dest for f in LAUNCH_FLAGS)


def launch_args(argv: Sequence[str]) -> argparse.Namespace:
    """The launch flags of `argv` (the rest is left to the command's own parser)."""
    ns, _ = build_parser(LAUNCH_FLAGS, suppress_defaults=True).parse_known_args(list(argv))
    return argparse.Namespace(**{d: getattr(ns, d, None) for d in LAUNCH_DESTS})


def join(argv: Sequence[str]) -> bool:
    """Start the distributed runtime when `argv` or a launcher's environment asks for several
    processes (call before any other JAX use); on processes other than 0, silence stdout (process
    0 alone reports). CPU computations run on the calling thread, so a step reuses the pages of
    the last step's buffers (`training.memory`). Returns whether this is a multi-process run."""
    from molfun_jax.training.distributed import initialize, is_primary
    from molfun_jax.training.memory import synchronous_cpu_dispatch

    synchronous_cpu_dispatch()
    ns = launch_args(argv)
    try:
        started = initialize(ns.coordinator_address, ns.num_processes, ns.process_id)
    except (ValueError, RuntimeError) as e:  # e.g. a missing address or an unreachable coordinator
        print(f"error: joining the multi-process run: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    if started and not is_primary():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- lives as long as the process
    return started
