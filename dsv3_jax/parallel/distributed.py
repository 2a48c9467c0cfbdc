"""Multi-process start-up: one JAX process per host (or per group of devices), joined by
`jax.distributed.initialize` before any computation.

Explicit: every process gets the same `coordinator_address` (host:port of process 0) and
`num_processes`, and its own `process_id`. Implicit: under a cluster launcher that jax recognises
(Slurm's srun, Open MPI's mpirun, multi-host Cloud TPU, or JAX_COORDINATOR_ADDRESS set) the
arguments come from the environment. A plain single-process run initialises nothing.

Timeouts are bounded on purpose: a peer that never starts makes the others fail after
`initialization_timeout` seconds, and a peer that dies mid-run stops sending heartbeats, so the
coordination service shuts the others down after `heartbeat_timeout` seconds instead of leaving
them blocked in a collective forever.
"""
from __future__ import annotations

import os

import jax

INITIALIZATION_TIMEOUT_S = 300
HEARTBEAT_TIMEOUT_S = 60


def _int_env(name: str) -> int:
    try:
        return int(os.environ.get(name, ""))
    except ValueError:
        return 0


def cluster_detected() -> str | None:
    """The launcher whose environment describes a multi-process job, or None."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    # srun sets SLURM_PROCID per task; SLURM_JOB_ID alone is also set in a plain salloc shell.
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and _int_env("SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and _int_env("OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    if "," in env.get("TPU_PROCESS_ADDRESSES", env.get("TPU_WORKER_HOSTNAMES", "")):
        return "cloud-tpu"
    return None


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, initialization_timeout: int = INITIALIZATION_TIMEOUT_S,
                     heartbeat_timeout: int = HEARTBEAT_TIMEOUT_S) -> bool:
    """Join the multi-process job if one is described (by arguments or by the environment).

    Returns True when jax.distributed was initialised. Must run before anything touches a device.
    Raises ValueError for an incomplete or inconsistent explicit description.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v not in (None, "") for v in explicit):
        if not coordinator_address or num_processes is None or process_id is None:
            raise ValueError("a multi-process run needs all of --coordinator_address, --num_processes and "
                             f"--process_id; got {coordinator_address!r}, {num_processes!r}, {process_id!r}")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} with --num_processes={num_processes}: "
                             "need 0 <= process_id < num_processes")
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    elif cluster_detected():
        kwargs = {}  # jax reads the launcher's environment itself
    else:
        return False
    # Collectives between processes on CPU devices need an implementation; gloo is the portable
    # one. It only concerns the CPU client, so it is harmless on GPU and TPU runs, and it must be
    # set before the backends start (the same is true of initialize itself).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs, initialization_timeout=initialization_timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout)
    return True
