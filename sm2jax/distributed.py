"""Many processes, one study, through JAX's own SPMD runtime (``jax.distributed``).

Every process runs the same study code on the same directory (a shared file system, as checkpoints
need on any cluster). The ``trials`` mesh spans every process's devices
(:class:`sm2jax.placement.Placement`); each process trains the rows on its own devices and reads the
evaluation of every row back (:meth:`~sm2jax.placement.Placement.host`), so that every process takes
the same decisions. Process 0 alone writes: ``spec.json``, progress, the ledger, ``results.json``
(Orbax coordinates the checkpoints itself). Every process meters its own devices; a
:class:`DistributedMeter` gathers the readings at each window boundary, so the ledger charges each
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

from sm2jax.energy.meters import Meter, Sample


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


class DistributedMeter(Meter):
    """Every process's meter read at once: a sample's keys are ``pP/KEY`` for process ``P``'s
    meter key ``KEY``, and its time is process 0's clock, so every process holds identical samples
    (and so takes identical merge decisions). Each :meth:`sample` is a collective: every process must
    sample at the same points, as the study's windows do.

    Args:
      inner: this process's meter (the same method on every process).
    """

    def __init__(self, inner: Meter):
        self.inner = inner
        self.method, self.reason = inner.method, inner.reason
        self.resolution_s, self.update_s = inner.resolution_s, inner.update_s
        self.host = getattr(inner, "host", None)
        first = inner.sample()
        self._keys = sorted(first.joules) if first.joules is not None else []
        local_map = {str(d): list(inner.device_keys(d)) for d in jax.local_devices()}
        self._layout = allgather_json({"keys": self._keys, "devices": local_map, "method": inner.method})
        methods = {p["method"] for p in self._layout}
        if len(methods) > 1:
            self.method, self.reason = (
                "unavailable",
                f"processes meter differently ({', '.join(sorted(methods))}): no common figure",
            )
        self._width = max(len(p["keys"]) for p in self._layout)
        self.devices = (
            [{**e, "nvml": f"p{i}/{e['nvml']}"} for i, e in enumerate(inner.devices or [])] if inner.devices else None
        )

    def device_keys(self, device: Any) -> tuple[str, ...]:
        p = int(device.process_index)
        layout = self._layout[p]
        keys = layout["devices"].get(str(device), [])
        if keys == ["*"]:
            keys = layout["keys"]
        return tuple(f"p{p}/{k}" for k in keys)

    def sample(self) -> Sample:
        s = self.inner.sample()
        vec = np.full(2 + self._width, np.nan)
        vec[0] = s.time
        if s.host is not None:
            vec[1] = s.host
        if s.joules is not None:
            vec[2 : 2 + len(self._keys)] = [s.joules[k] for k in self._keys]
        rows = allgather(vec)
        joules: dict[str, float] | None = {}
        for p, layout in enumerate(self._layout):
            values = rows[p, 2 : 2 + len(layout["keys"])]
            if np.isnan(values).any():
                joules = None
                break
            joules.update({f"p{p}/{k}": float(v) for k, v in zip(layout["keys"], values)})
        host = None if np.isnan(rows[:, 1]).any() else float(rows[:, 1].sum())
        if self.method == "unavailable":
            joules = None
        return Sample(float(rows[0, 0]), joules, host)

    def close(self) -> None:
        self.inner.close()
