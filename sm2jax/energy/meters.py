"""Energy meters: cumulative energy readings per device, labelled with how they were obtained.

Every meter exposes :meth:`Meter.sample`, a cumulative reading (joules since an arbitrary origin, per
device) with a timestamp; a window's energy is the difference of two samples. Methods:

* ``nvml-counter`` -- ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since driver load, Volta+). It
  updates roughly every 100 ms, so windows should last a second or more.
* ``nvml-power`` -- a background thread polls ``nvmlDeviceGetPowerUsage`` (mW) and integrates with
  the trapezoid rule, for GPUs whose counter is not supported.
* ``nvml-mixed`` -- some cards by their counter, the others by polled power (:mod:`sm2jax.energy.nvml`).
* ``rapl`` -- ``/sys/class/powercap/intel-rapl:*/energy_uj`` (uJ), unwrapped through
  ``max_energy_range_uj``. Unreadable files (root-only since CVE-2020-8694) make it unavailable.
* ``estimated`` -- process CPU time x a per-core power figure. Not a measurement: it is labelled so.
* ``unavailable`` -- nothing could be read; figures are ``None``, never zero.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from sm2jax.distributed import allgather, allgather_json
from sm2jax.energy.base import Meter, Sample, UnavailableMeter
from sm2jax.energy.nvml import make_nvml_meter

DEFAULT_WATTS_PER_CORE = 10.0
"""The ``estimated`` method's power per busy CPU core (process CPU seconds x this)."""

METHODS = ("nvml-counter", "nvml-power", "nvml-mixed", "rapl", "estimated", "unavailable")


class EstimateMeter(Meter):
    """Process CPU time x ``watts_per_core`` (default 10 W per busy core, a mid-range server core).

    The estimate can be off by -60 %..+190 %; records are labelled ``estimated`` and must never be
    compared with measured figures as equals.
    """

    method = "estimated"

    def __init__(
        self, watts_per_core: float = DEFAULT_WATTS_PER_CORE, cpu_time: Callable[[], float] = time.process_time
    ):
        if not watts_per_core > 0:
            raise ValueError(f"watts_per_core must be positive (got {watts_per_core})")
        self.watts_per_core = watts_per_core
        self.reason = f"process CPU time x {watts_per_core:g} W/core"
        self._cpu_time = cpu_time

    def sample(self) -> Sample:
        return Sample(time.perf_counter(), {"cpu": self._cpu_time() * self.watts_per_core})


class RaplMeter(Meter):
    """CPU package/DRAM energy from the powercap tree, unwrapped at ``max_energy_range_uj``.

    A wrap is detected when a zone's counter is smaller than at the previous sample; one full range
    is added. Sampling at least once per wrap period (minutes at typical power) is the caller's job:
    every window boundary samples.
    """

    method = "rapl"
    resolution_s = 0.01  # RAPL counters update about every millisecond
    update_s = 0.001

    def __init__(self, zones: dict[str, str]):
        self.zones = zones  # name -> directory with energy_uj and max_energy_range_uj
        self._range = {z: _read_int(os.path.join(p, "max_energy_range_uj")) for z, p in zones.items()}
        self._last = {z: self._raw(z) for z in zones}
        self._offset = {z: 0 for z in zones}
        self._lock = threading.Lock()

    def _raw(self, zone: str) -> int:
        return _read_int(os.path.join(self.zones[zone], "energy_uj"))

    def sample(self) -> Sample:
        with self._lock:
            t = time.perf_counter()
            out = {}
            for z in self.zones:
                raw = self._raw(z)
                if raw < self._last[z]:
                    self._offset[z] += self._range[z]
                self._last[z] = raw
                out[z] = (raw + self._offset[z]) / 1e6
            return Sample(t, out)


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read())


def find_rapl_zones(root: str = "/sys/class/powercap") -> tuple[dict[str, str], str]:
    """Readable top-level RAPL zones under ``root`` (``intel-rapl:N`` and their DRAM subzones),
    or an empty dict with the reason."""
    dirs = sorted(glob.glob(os.path.join(root, "intel-rapl:*")))
    if not dirs:
        return {}, f"no RAPL zones under {root}"
    zones, denied = {}, []
    for d in dirs:
        try:
            with open(os.path.join(d, "name")) as f:
                name = f.read().strip()
            _read_int(os.path.join(d, "energy_uj"))
            _read_int(os.path.join(d, "max_energy_range_uj"))
        except PermissionError:
            denied.append(d)
            continue
        except (OSError, ValueError):
            continue
        if name.startswith("package") or name == "dram":
            zones[f"{os.path.basename(d)}:{name}"] = d
    if zones:
        return zones, ""
    if denied:
        return {}, "RAPL energy_uj is not readable (root-only since CVE-2020-8694)"
    return {}, "no readable package/dram RAPL zone"


def make_host_meter(rapl_root: str = "/sys/class/powercap", watts_per_core: float = DEFAULT_WATTS_PER_CORE) -> Meter:
    """RAPL if readable, else the CPU-time estimate."""
    zones, _ = find_rapl_zones(rapl_root)
    return RaplMeter(zones) if zones else EstimateMeter(watts_per_core)


def make_meter(
    method: str = "auto",
    *,
    nvml: Any | None = None,
    rapl_root: str = "/sys/class/powercap",
    watts_per_core: float = DEFAULT_WATTS_PER_CORE,
    interval_s: float = 0.1,
    gpus: list[dict[str, Any]] | str | None = None,
    backend: str | None = None,
) -> Meter:
    """Chooses the meter of the devices JAX computes on.

    ``auto``: on GPUs, NVML (counter, else power) for the GPUs JAX uses (``gpus``, default
    :func:`jax_gpus`); on the CPU backend, RAPL if readable, else the CPU-time estimate. When the
    accelerator cannot be metered (a TPU, or GPUs without NVML) the method is ``unavailable`` with
    the host meter read alongside for its own line: a host figure is never the study's energy. A
    named method that cannot work gives ``unavailable``.
    """
    if method not in ("auto", *METHODS):
        raise ValueError(f"unknown energy method {method!r}; known: auto, {', '.join(METHODS)}")
    if backend is None:
        backend = jax.default_backend()
    if gpus is None and backend != "gpu":
        gpus = []
    if method in ("nvml-counter", "nvml-power", "nvml-mixed"):
        prefer = "nvml-power" if method == "nvml-power" else "nvml-counter"
        return make_nvml_meter(nvml, prefer=prefer, interval_s=interval_s, gpus=gpus)
    if method == "auto":
        if gpus != []:
            meter = make_nvml_meter(nvml, interval_s=interval_s, gpus=gpus)
            if meter.method != "unavailable":
                return meter
            return UnavailableMeter(
                f"the GPU(s) JAX uses cannot be metered ({meter.reason})",
                host=make_host_meter(rapl_root, watts_per_core),
            )
        if backend != "cpu":
            return UnavailableMeter(
                f"JAX computes on {backend}, whose energy cannot be metered here",
                host=make_host_meter(rapl_root, watts_per_core),
            )
        return make_host_meter(rapl_root, watts_per_core)
    if method == "rapl":
        zones, reason = find_rapl_zones(rapl_root)
        return RaplMeter(zones) if zones else UnavailableMeter(reason)
    if method == "estimated":
        return EstimateMeter(watts_per_core)
    return UnavailableMeter("energy measurement disabled")


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
        self.events = inner.events
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
