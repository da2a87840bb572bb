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

import jax
import numpy as np

from sm2jax.distributed import allgather, allgather_json

DEFAULT_WATTS_PER_CORE = 10.0
"""The ``estimated`` method's power per busy CPU core (process CPU seconds x this)."""

METHODS = ("nvml-counter", "nvml-power", "rapl", "estimated", "unavailable")


@dataclasses.dataclass(frozen=True)
class Sample:
    """A cumulative reading: joules per device (``None`` if unreadable) at ``time`` (perf_counter);
    ``host``: the host meter's cumulative joules when the accelerator itself cannot be metered."""

    time: float
    joules: dict[str, float] | None
    host: float | None = None


class Meter:
    """Base class: subclasses implement :meth:`sample`.

    Attributes:
      method: how readings are obtained (:data:`METHODS`).
      reason: why this method (or why nothing) was chosen.
      resolution_s: the shortest window whose figure can be trusted; shorter windows are merged
        with the next one by the study's metering.
      update_s: the reading's update period (``None``: no stated bound); a window of ``T`` seconds
        is then uncertain by about ``update_s / T``.
    """

    method: str = "unavailable"
    reason: str = ""
    resolution_s: float = 0.0
    update_s: float | None = None
    devices: list[dict[str, Any]] | None = None  # what is metered, and how each device was found

    def sample(self) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Releases threads or library handles."""

    def describe(self) -> str:
        return self.method + (f" ({self.reason})" if self.reason else "")

    def device_keys(self, device: Any) -> tuple[str, ...]:
        """The keys of :attr:`Sample.joules` whose energy a JAX ``device`` draws on: its own GPU for
        a per-device meter (found through :attr:`devices`), every key for a host meter (all the
        host's devices share it); empty when the device is not metered."""
        if self.devices:
            return tuple(e["nvml"] for e in self.devices if e.get("jax") == str(device))
        return ("*",)  # the whole sample


class UnavailableMeter(Meter):
    """Nothing can be measured; every window reports ``None`` joules, labelled ``unavailable``.

    ``host``: a meter of the host (RAPL or the CPU-time estimate) read alongside when the
    accelerator is what cannot be metered: its figure is reported on its own line, never as the
    study's energy.
    """

    method = "unavailable"

    def __init__(self, reason: str, host: Meter | None = None):
        self.reason = reason
        self.host = host

    def sample(self) -> Sample:
        host = None
        if self.host is not None:
            reading = self.host.sample().joules
            host = None if reading is None else float(sum(reading.values()))
        return Sample(time.perf_counter(), None, host)

    def close(self) -> None:
        if self.host is not None:
            self.host.close()


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


def _import_nvml():
    import pynvml  # nvidia-ml-py

    return pynvml


class NvmlCounterMeter(Meter):
    """Sums ``nvmlDeviceGetTotalEnergyConsumption`` (mJ) over the given devices."""

    method = "nvml-counter"
    resolution_s = 1.0  # the counter updates about every 100 ms: 1 s windows are within ~10 %
    update_s = 0.1

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
    resolution_s = 1.0  # the power reading is itself a ~1 s average on recent GPUs
    update_s = 0.1

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


def jax_gpus(devices: list[Any] | None = None) -> list[dict[str, Any]]:
    """The GPUs among ``devices`` and what identifies each to NVML, whose numbering ignores
    ``CUDA_VISIBLE_DEVICES``: the device's PCI bus id where JAX exposes it, else the UUID or index
    that ``CUDA_VISIBLE_DEVICES`` names for it (an index assumes ``CUDA_DEVICE_ORDER=PCI_BUS_ID``,
    NVML's order), else its ordinal. ``devices`` defaults to JAX's default device (a study passes
    the devices of its trials axis); empty when none is a GPU."""
    import jax

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [v.strip() for v in visible.split(",") if v.strip()] if visible else None
    out = []
    for d in jax.devices()[:1] if devices is None else devices:
        if d.platform != "gpu":
            continue
        entry: dict[str, Any] = {"jax": str(d)}
        bus = getattr(d, "pci_bus_id", None)
        local = getattr(d, "local_hardware_id", None)
        ordinal = int(d.id if local is None else local)  # 0 is a valid ordinal, not a missing one
        if bus:
            entry["pci_bus_id"], entry["by"] = str(bus), "PCI bus id reported by JAX"
        elif names is not None and ordinal < len(names):
            name = names[ordinal]
            if name.isdigit():
                entry["index"], entry["by"] = int(name), "CUDA_VISIBLE_DEVICES index (PCI bus order assumed)"
            else:
                entry["uuid"], entry["by"] = name, "CUDA_VISIBLE_DEVICES UUID"
        else:
            entry["index"], entry["by"] = ordinal, "CUDA ordinal (no CUDA_VISIBLE_DEVICES)"
        out.append(entry)
    return out


def nvml_handles(nvml: Any, gpus: list[dict[str, Any]] | str = "all") -> dict[str, Any]:
    """NVML handles keyed by PCI bus id (else ``gpuN``): every device (``"all"``) or the listed ones,
    each found by ``pci_bus_id``, ``uuid`` or ``index``."""

    def key(handle, fallback):
        try:
            bus = nvml.nvmlDeviceGetPciInfo(handle).busId
            return bus.decode() if isinstance(bus, bytes) else str(bus)
        except Exception:
            return fallback

    if gpus == "all":
        handles = [(nvml.nvmlDeviceGetHandleByIndex(i), f"gpu{i}") for i in range(nvml.nvmlDeviceGetCount())]
    else:
        handles = []
        for g in gpus:
            if "pci_bus_id" in g:
                handles.append((nvml.nvmlDeviceGetHandleByPciBusId(g["pci_bus_id"]), g["pci_bus_id"]))
            elif "uuid" in g:
                handles.append((nvml.nvmlDeviceGetHandleByUUID(g["uuid"]), g["uuid"]))
            else:
                handles.append((nvml.nvmlDeviceGetHandleByIndex(int(g["index"])), f"gpu{int(g['index'])}"))
    return {key(h, name): h for h, name in handles}


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
    except Exception as err:
        return None, f"NVML unavailable: {err}"
    return nvml, ""


def make_nvml_meter(
    nvml: Any | None = None,
    *,
    prefer: str = "nvml-counter",
    interval_s: float = 0.1,
    gpus: list[dict[str, Any]] | str | None = None,
) -> Meter:
    """The best NVML meter for ``gpus`` (default: the GPUs JAX uses, :func:`jax_gpus`; ``"all"``:
    every GPU NVML sees): the counter if every device supports it, else power polling.

    Never raises: a missing library, no GPU in use or an NVML error gives an :class:`UnavailableMeter`.
    """
    gpus = jax_gpus() if gpus is None else gpus
    if not gpus:
        return UnavailableMeter("JAX uses no GPU: there is no GPU energy to meter")
    nvml, reason = open_nvml(nvml)
    if nvml is None:
        return UnavailableMeter(reason)
    try:
        handles = nvml_handles(nvml, gpus)
        mapping = [{"nvml": key, **({} if gpus == "all" else gpus[i])} for i, key in enumerate(handles)]
        if prefer == "nvml-counter":
            try:
                for h in handles.values():
                    nvml.nvmlDeviceGetTotalEnergyConsumption(h)
                counter = NvmlCounterMeter(nvml, handles)
                counter.devices = mapping
                return counter
            except nvml.NVMLError:
                pass  # NotSupported (pre-Volta, some vGPUs): fall back to polling power
        for h in handles.values():
            nvml.nvmlDeviceGetPowerUsage(h)
        meter = NvmlPowerMeter(nvml, handles, interval_s)
        meter.devices = mapping
        if prefer == "nvml-counter":
            meter.reason = f"energy counter not supported; power polled every {interval_s:g} s"
        return meter
    except Exception as err:
        return UnavailableMeter(f"NVML error: {err}")


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
        import jax

        backend = jax.default_backend()
    if gpus is None and backend != "gpu":
        gpus = []
    if method in ("nvml-counter", "nvml-power"):
        return make_nvml_meter(nvml, prefer=method, interval_s=interval_s, gpus=gpus)
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
