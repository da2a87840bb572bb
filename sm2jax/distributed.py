"""Many processes, one study, through JAX's own SPMD runtime (``jax.distributed``).

Every process runs the same study code on the same directory (a shared file system, as checkpoints
need on any cluster). The ``trials`` mesh spans every process's devices
(:class:`sm2jax.execute.placement.Placement`); each process trains the rows on its own devices and reads the
evaluation of every row back (:meth:`~sm2jax.execute.placement.Placement.host`), so that every process takes
the same decisions. Process 0 alone writes: ``spec.json``, progress, the ledger, ``results.json``
(Orbax coordinates the checkpoints itself). Every process meters its own devices; a
:class:`~sm2jax.energy.meters.DistributedMeter` gathers the readings at each window boundary, so the ledger charges each
trial from the devices its rows ran on, whichever process they belong to.

Starting: ``sm2jax run --coordinator HOST:PORT --num-processes N --process-id I`` on each host (or
``--distributed`` where ``jax.distributed.initialize()`` finds them itself: TPU pods, SLURM, ...).
On CPU hosts the cross-process collectives use gloo.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> None:
    """Joins this process to a multi-process study (call before any JAX computation).

    With no argument, ``jax.distributed.initialize()`` finds the cluster itself (TPU, SLURM, Open
    MPI ...); otherwise all three are needed.

    Raises:
      ValueError: some but not all of the three are given, or ``process_id`` is out of range.
    """
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError(
            "multi-process: give --coordinator HOST:PORT, --num-processes N and --process-id I together (or --distributed to detect them on TPU/SLURM)"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process-id {process_id} is outside 0..{num_processes - 1} (--num-processes {num_processes})"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; GPUs and TPUs use their own
    if coordinator is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def is_primary() -> bool:
    """Whether this process writes the study's files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process got here (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def allgather(vector: np.ndarray) -> np.ndarray:
    """``[processes, *vector.shape]``: every process's ``vector`` (the same shape everywhere)."""
    if jax.process_count() == 1:
        return np.asarray(vector)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(vector)))


def allgather_json(blob: Any) -> list[Any]:
    """Every process's JSON-serialisable ``blob``, in process order."""
    raw = np.frombuffer(json.dumps(blob).encode(), np.uint8)
    length = int(allgather(np.asarray([raw.size], np.int64)).max())
    padded = np.zeros(length, np.uint8)
    padded[: raw.size] = raw
    return [json.loads(bytes(row).rstrip(b"\x00").decode()) for row in allgather(padded)]
