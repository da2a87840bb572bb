"""Where a study's arrays live: one ``trials`` mesh axis over the devices, and nothing else.

A cohort's W-wide chunk is sharded over the ``trials`` axis of a 1-D mesh of ``n`` devices: each
device holds ``W / n`` rows and trains them alone (the step has no cross-device collective); the data
set is replicated. Widths are therefore multiples of ``n`` (:meth:`Placement.round_width`), and the
rows a device holds are contiguous: row ``i`` of a chunk lives on device ``i // (W / n)``
(:meth:`Placement.row_devices`), which is how each trial's energy is charged to its device.

Over several processes (``jax.distributed``) the mesh holds every process's devices; arrays are built
from host rows that every process holds in full (:meth:`Placement.put`), and read back on every host
(:meth:`Placement.host`) so that all processes take the same decisions.

This module is the one owner of meshes and shardings: the trainer asks it for the sharded program,
the runner for widths, the study for host copies.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

TRIALS = "trials"


@dataclasses.dataclass(frozen=True, eq=False)
class Placement:
    """A 1-D ``trials`` mesh.

    Attributes:
      mesh: the mesh (axis ``trials``).
    """

    mesh: Mesh

    @classmethod
    def create(cls, devices: Sequence[jax.Device] | int | None = None) -> Placement:
        """A mesh over ``devices``: a list, a count (the first ``n`` of :func:`jax.devices`), or
        ``None`` for every device of every process (one process: all local devices).

        Raises:
          ValueError: a count outside ``1..len(jax.devices())``.
        """
        available = jax.devices()
        if devices is None:
            # Processes take turns along the axis, so that trials spread over hosts first.
            devices = sorted(
                available,
                key=lambda d: ([e for e in available if e.process_index == d.process_index].index(d), d.process_index),
            )
        elif isinstance(devices, int):
            if not 1 <= devices <= len(available):
                raise ValueError(
                    f"devices: {devices} requested, {len(available)} available ({available[0].platform}); pass a count from 1 to {len(available)}, or none for all"
                )
            if jax.process_count() > 1 and devices != len(available):
                raise ValueError(
                    f"devices: a multi-process study uses every device of every process ({len(available)}); do not pass a count"
                )
            devices = available[:devices]
        return cls(Mesh(np.asarray(list(devices)), (TRIALS,)))

    @property
    def size(self) -> int:
        """Devices on the ``trials`` axis."""
        return int(self.mesh.devices.size)

    @property
    def devices(self) -> list[jax.Device]:
        return list(self.mesh.devices.flat)

    @property
    def key(self) -> tuple[int, ...]:
        """Identifies the devices (for the table of compiled programs)."""
        return tuple(int(d.id) for d in self.devices)

    def __eq__(self, other: object) -> bool:  # equal devices: the same placement (program keys)
        return isinstance(other, Placement) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def describe(self) -> dict[str, Any]:
        """The devices, process count and platform (what results record)."""
        return {
            "devices": [str(d) for d in self.devices],
            "processes": jax.process_count(),
            "platform": self.devices[0].platform,
        }

    @property
    def rows(self) -> NamedSharding:
        """Leading (trial) axis split over the devices."""
        return NamedSharding(self.mesh, PartitionSpec(TRIALS))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def round_width(self, width: int) -> int:
        """The smallest multiple of the device count that is at least ``width`` (at least one row
        per device)."""
        n = self.size
        return max(n, -(-int(width) // n) * n)

    def row_devices(self, width: int) -> list[jax.Device]:
        """The device each row of a ``width``-wide chunk lives on."""
        per = width // self.size
        return [self.devices[i // per] for i in range(width)]

    def slots(self, k: int, width: int) -> np.ndarray:
        """Where ``k`` trials sit among the rows of their ``ceil(k / width)`` chunks (positions in
        the chunks' concatenation). Inside a chunk the ``j``-th trial goes to device ``j mod n``, so
        that a chunk with fewer trials than rows spreads them over every device (padding fills each
        device's last rows) instead of leaving whole devices, or hosts, with nothing to train."""
        n, per = self.size, width // self.size
        j = np.arange(k)
        within = j % width
        return (j - within) + (within % n) * per + within // n

    def trial_devices(self, k: int, width: int) -> list[jax.Device]:
        """The device each of ``k`` trials (in order) lives on."""
        on = self.row_devices(width)
        return [on[int(s) % width] for s in self.slots(k, width)]

    # ------------------------------------------------------------------------------ transfers

    def put(self, tree: Any, sharding: NamedSharding) -> Any:
        """Host arrays (the same on every process) as global arrays with ``sharding``."""
        if jax.process_count() == 1:
            return jax.device_put(tree, sharding)
        return jax.tree.map(
            lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda idx, a=a: np.asarray(a)[idx]), tree
        )

    def put_rows(self, tree: Any) -> Any:
        """Host rows (leading axis a multiple of :attr:`size`) sharded over the devices."""
        return self.put(tree, self.rows)

    def put_replicated(self, tree: Any) -> Any:
        return self.put(tree, self.replicated)

    def host(self, tree: Any) -> Any:
        """Numpy copies of global arrays on every process (gathered from the other processes'
        devices where needed)."""
        if jax.process_count() == 1:
            return jax.device_get(tree)
        from jax.experimental import multihost_utils

        def get(a):
            if isinstance(a, jax.Array) and not a.is_fully_addressable:
                return np.asarray(multihost_utils.process_allgather(a, tiled=True))
            return np.asarray(a)

        return jax.tree.map(get, tree)

    def map_rows(self, fn, *args: Any, replicated: int = 0) -> Any:
        """``fn`` applied to each device's rows of ``args[:len(args) - replicated]``; the last
        ``replicated`` arguments reach every device whole. Inside ``jit``. No collective: each device
        computes its own rows, and the outputs stay sharded by row."""
        if self.size == 1:
            return fn(*args)
        k = len(args) - replicated
        specs = tuple(PartitionSpec(TRIALS) for _ in range(k)) + tuple(PartitionSpec() for _ in range(replicated))
        return jax.shard_map(fn, mesh=self.mesh, in_specs=specs, out_specs=PartitionSpec(TRIALS), check_vma=False)(
            *args
        )


MAX_CPU_DEVICES = 8


def request_cpu_devices(n: int | None = None) -> int | None:
    """Asks XLA for ``n`` host-platform (CPU) devices (default: the usable cores, at most
    :data:`MAX_CPU_DEVICES`), unless ``XLA_FLAGS`` already sets the count. Call before JAX starts
    its backends (the command line does it first thing); it changes nothing on GPUs or TPUs.

    Why: on a CPU one XLA device runs a small model's step on about one core. A trials axis of one
    device per core trains each device's rows on its own core (the README's scaling table and
    ``experiments/bench/scaling.py`` have the figures). A device holding only padding or diverged
    trials skips the step. Cohorts use every device from the start: starting on one device and
    spreading only when the predicted training paid for the sharded programs' compilation was
    tried, and lost (README, *More devices*).

    Returns:
      The count requested, or ``None`` when ``XLA_FLAGS`` already chose one.
    """
    if n is not None and n < 1:
        raise ValueError(f"--cpu-devices must be at least 1 (got {n})")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return None
    if n is None:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            n = os.cpu_count() or 1
        n = min(n, MAX_CPU_DEVICES)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(n)}".strip()
    return int(n)


_DEFAULT: Placement | None = None


def default_placement() -> Placement:
    """One device (JAX's default): what a trainer built without a placement uses."""
    global _DEFAULT
    if _DEFAULT is None or _DEFAULT.devices[0] != jax.devices()[0]:
        _DEFAULT = Placement.create(1)
    return _DEFAULT


COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter", "collective-broadcast")


def collectives_in(compiled) -> list[str]:
    """Cross-device collectives in a compiled program's optimised HLO (empty for a per-device program)."""
    text = compiled.as_text()
    return [c for c in COLLECTIVES if f" {c}(" in text or f" {c}-start(" in text]
