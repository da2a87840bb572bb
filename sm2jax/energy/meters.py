"""Energy meters: cumulative energy readings per device, labelled with how they were obtained.

Every meter exposes :meth:`Meter.sample`, a cumulative reading (joules since an arbitrary origin, per
device) with a timestamp; a window's energy is the difference of two samples. Methods:

* ``nvml-counter`` -- ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since driver load, Volta+). It
  updates roughly every 100 ms, so windows should last a second or more.
* ``nvml-power`` -- a background thread polls ``nvmlDeviceGetPowerUsage`` (mW) and integrates with
  the trapezoid rule, for GPUs whose counter is not supported.
* ``rapl`` -- ``/sys/class/powercap/intel-rapl:*/energy_uj`` (uJ), unwrapped through
  ``max_energy_range_uj``. Unreadable files (root-only since CVE-2020-8694) make it unavailable.
* ``estimated`` -- process CPU time x a per-core power figure. Not a measurement: it is labelled so.
* ``unavailable`` -- nothing could be read; figures are ``None``, never zero.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import threading
import time
from collections.abc import Callable
from typing import Any

METHODS = ("nvml-counter", "nvml-power", "rapl", "estimated", "unavailable")


@dataclasses.dataclass(frozen=True)
class Sample:
    """A cumulative reading: joules per device (``None`` if unreadable) at ``time`` (perf_counter)."""

    time: float
    joules: dict[str, float] | None


class Meter:
    """Base class: subclasses implement :meth:`sample`."""

    method: str = "unavailable"
    reason: str = ""

    def sample(self) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Releases threads or library handles."""

    def describe(self) -> str:
        return self.method + (f" ({self.reason})" if self.reason else "")


class UnavailableMeter(Meter):
    """Nothing can be measured; every window reports ``None`` joules, labelled ``unavailable``."""

    method = "unavailable"

    def __init__(self, reason: str):
        self.reason = reason

    def sample(self) -> Sample:
        return Sample(time.perf_counter(), None)


class EstimateMeter(Meter):
    """Process CPU time x ``watts_per_core`` (default 10 W per busy core, a mid-range server core).

    The estimate can be off by -60 %..+190 %; records are labelled ``estimated`` and must never be
    compared with measured figures as equals.
    """

    method = "estimated"

    def __init__(self, watts_per_core: float = 10.0, cpu_time: Callable[[], float] = time.process_time):
        if not watts_per_core > 0:
            raise ValueError(f"watts_per_core must be positive (got {watts_per_core})")
        self.watts_per_core = watts_per_core
        self.reason = f"process CPU time x {watts_per_core:g} W/core"
        self._cpu_time = cpu_time

    def sample(self) -> Sample:
        return Sample(time.perf_counter(), {"cpu": self._cpu_time() * self.watts_per_core})


def _import_nvml():
    import pynvml  # nvidia-ml-py

    return pynvml


def _device_name(nvml, handle) -> str:
    name = nvml.nvmlDeviceGetName(handle)
    return name.decode() if isinstance(name, bytes) else str(name)


class NvmlCounterMeter(Meter):
    """Sums ``nvmlDeviceGetTotalEnergyConsumption`` (mJ) over the given devices."""

    method = "nvml-counter"

    def __init__(self, nvml: Any, handles: dict[str, Any]):
        self.nvml, self.handles = nvml, handles

    def sample(self) -> Sample:
        t = time.perf_counter()
        return Sample(t, {d: self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3 for d, h in self.handles.items()})


class NvmlPowerMeter(Meter):
    """Integrates polled ``nvmlDeviceGetPowerUsage`` (mW) with the trapezoid rule in a thread.

    On Ampere and newer (except A100) the power reading is itself a 1 s average, and polling sees
    only part of the runtime on A100/H100: prefer the counter where supported.
    """

    method = "nvml-power"

    def __init__(self, nvml: Any, handles: dict[str, Any], interval_s: float = 0.1):
        self.nvml, self.handles, self.interval_s = nvml, handles, interval_s
        self._lock = threading.Lock()
        self._energy = {d: 0.0 for d in handles}
        self._last_t = time.perf_counter()
        self._last_w = self._read_watts()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sm2jax-nvml-power", daemon=True)
        self._thread.start()

    def _read_watts(self) -> dict[str, float]:
        return {d: self.nvml.nvmlDeviceGetPowerUsage(h) / 1e3 for d, h in self.handles.items()}

    def _advance(self) -> None:
        now, watts = time.perf_counter(), self._read_watts()
        with self._lock:
            dt = now - self._last_t
            for d in self._energy:
                self._energy[d] += 0.5 * (watts[d] + self._last_w[d]) * dt
            self._last_t, self._last_w = now, watts

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._advance()

    def sample(self) -> Sample:
        self._advance()  # integrate up to now, not to the last poll
        with self._lock:
            return Sample(self._last_t, dict(self._energy))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * self.interval_s + 1)


class RaplMeter(Meter):
    """CPU package/DRAM energy from the powercap tree, unwrapped at ``max_energy_range_uj``.

    A wrap is detected when a zone's counter is smaller than at the previous sample; one full range
    is added. Sampling at least once per wrap period (minutes at typical power) is the caller's job:
    every window boundary samples.
    """

    method = "rapl"

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


def nvml_handles(nvml: Any, device_indices: list[int] | None = None) -> dict[str, Any]:
    count = nvml.nvmlDeviceGetCount()
    indices = range(count) if device_indices is None else device_indices
    return {f"gpu{i}": nvml.nvmlDeviceGetHandleByIndex(i) for i in indices}


def open_nvml(nvml: Any | None = None) -> tuple[Any | None, str]:
    """Imports (unless given) and initialises NVML; returns ``(module, "")`` or ``(None, reason)``."""
    try:
        nvml = nvml or _import_nvml()
    except ImportError:
        return None, "nvidia-ml-py (module pynvml) is not installed"
    try:
        nvml.nvmlInit()
        if nvml.nvmlDeviceGetCount() < 1:
            return None, "NVML found no GPU"
    except Exception as err:  # noqa: BLE001 -- any NVML failure means "no NVML here"
        return None, f"NVML unavailable: {err}"
    return nvml, ""


def make_nvml_meter(nvml: Any | None = None, *, prefer: str = "nvml-counter", interval_s: float = 0.1, device_indices: list[int] | None = None) -> Meter:
    """The best NVML meter: the counter if every device supports it, else power polling.

    Never raises: a missing library or an NVML error gives an :class:`UnavailableMeter`.
    """
    nvml, reason = open_nvml(nvml)
    if nvml is None:
        return UnavailableMeter(reason)
    try:
        handles = nvml_handles(nvml, device_indices)
        if prefer == "nvml-counter":
            try:
                for h in handles.values():
                    nvml.nvmlDeviceGetTotalEnergyConsumption(h)
                return NvmlCounterMeter(nvml, handles)
            except nvml.NVMLError:
                pass  # NotSupported (pre-Volta, some vGPUs): fall back to polling power
        for h in handles.values():
            nvml.nvmlDeviceGetPowerUsage(h)
        meter = NvmlPowerMeter(nvml, handles, interval_s)
        if prefer == "nvml-counter":
            meter.reason = "energy counter not supported; power polled every %g s" % interval_s
        return meter
    except Exception as err:  # noqa: BLE001
        return UnavailableMeter(f"NVML error: {err}")


def make_meter(method: str = "auto", *, nvml: Any | None = None, rapl_root: str = "/sys/class/powercap", watts_per_core: float = 10.0, interval_s: float = 0.1) -> Meter:
    """Chooses a meter. ``auto``: NVML (counter, else power) if a GPU is visible, else RAPL if
    readable, else the CPU-time estimate. A named method that cannot work gives ``unavailable``."""
    if method not in ("auto", *METHODS):
        raise ValueError(f"unknown energy method {method!r}; known: auto, {', '.join(METHODS)}")
    if method in ("auto", "nvml-counter", "nvml-power"):
        meter = make_nvml_meter(nvml, prefer="nvml-power" if method == "nvml-power" else "nvml-counter", interval_s=interval_s)
        if method != "auto" or meter.method != "unavailable":
            return meter
    if method in ("auto", "rapl"):
        zones, reason = find_rapl_zones(rapl_root)
        if zones:
            return RaplMeter(zones)
        if method == "rapl":
            return UnavailableMeter(reason)
    if method in ("auto", "estimated"):
        return EstimateMeter(watts_per_core)
    return UnavailableMeter("energy measurement disabled")
