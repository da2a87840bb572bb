"""Energy windows around JAX work, the hardware profile, and the idle baseline."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax

from sm2jax.energy.base import Meter, Sample
from sm2jax.energy.gpus import text
from sm2jax.energy.nvml import close_nvml, open_nvml


@dataclasses.dataclass(frozen=True)
class WindowReading:
    """Energy of one window.

    Attributes:
      name: what the window covered (``compile``, ``explore``, ``rung-1`` ...).
      seconds: wall time between the two samples.
      joules: total over devices, or ``None`` when unavailable or invalid (never a stand-in zero).
      per_device: joules per device, or ``None``.
      method: the meter's method label.
      valid: false when the reading cannot be trusted; ``note`` says why.
      start, stop: the meter's cumulative samples at both ends (to merge windows).
      uncertainty: relative error bound from the meter's resolution (counter update period /
        seconds), ``None`` when it has no stated bound (an estimate is labelled ``estimated`` instead).
      host_joules, host_method: the host's energy over the window when the accelerator cannot be
        metered (reported on its own line, never as the study's energy).
    """

    name: str
    started: float
    seconds: float
    joules: float | None
    per_device: dict[str, float] | None
    method: str
    valid: bool
    note: str = ""
    start: Sample | None = None
    stop: Sample | None = None
    uncertainty: float | None = None
    host_joules: float | None = None
    host_method: str | None = None


@dataclasses.dataclass
class Window:
    name: str
    start: Any  # base.Sample
    covered: list = dataclasses.field(default_factory=list)

    def cover(self, outputs: Any) -> Any:
        """Registers JAX outputs produced in this window; the window blocks on them before it ends."""
        self.covered.append(outputs)
        return outputs


class EnergyMonitor:
    """Begin/end windows around asynchronous JAX work.

    ``begin`` blocks on ``after`` (work dispatched earlier must not leak into this window), then
    samples; ``end`` blocks on the covered outputs (JAX dispatch is asynchronous: without it the
    window would close before the work ran), then samples. Windows are independent pairs of
    samples, so they nest freely.

    Args:
      meter: the energy source.
      counter_resolution_s: the counter's update period; a counter window shorter than this that
        reads no change is marked invalid rather than reported as zero.
      min_window_s: NVML windows shorter than this carry a note that their figure is coarse.
    """

    def __init__(self, meter: Meter, counter_resolution_s: float = 0.1, min_window_s: float = 1.0):
        self.meter = meter
        self.counter_resolution_s = counter_resolution_s
        self.min_window_s = min_window_s

    @property
    def method(self) -> str:
        return self.meter.method

    def begin(self, name: str, after: Any = None) -> Window:
        if after is not None:
            jax.block_until_ready(after)
        return Window(name, self.meter.sample())

    @property
    def resolution_s(self) -> float:
        """The shortest window whose figure this meter can be trusted for (see :class:`Metering
        <sm2jax.energy.metering.Metering>`, which merges shorter windows)."""
        return getattr(self.meter, "resolution_s", 0.0)

    def end(self, window: Window, outputs: Any = None) -> WindowReading:
        if outputs is not None:
            window.cover(outputs)
        for out in window.covered:
            jax.block_until_ready(out)
        return self.between(window.name, window.start, self.meter.sample())

    def sample(self) -> Sample:
        return self.meter.sample()

    def _invalid(self, name: str, start: Sample, stop: Sample, why: str, **host: Any) -> WindowReading:
        """A window without a figure (``None`` joules, never a stand-in zero), saying why."""
        return WindowReading(
            name, start.time, stop.time - start.time, None, None, self.method, False, why, start, stop, **host
        )

    def between(self, name: str, start: Sample, stop: Sample) -> WindowReading:
        """The reading of a window from two cumulative samples of this monitor's meter."""
        seconds = stop.time - start.time
        if start.joules is None or stop.joules is None:
            host = getattr(self.meter, "host", None)
            host_joules = None if host is None or start.host is None or stop.host is None else stop.host - start.host
            why = "; ".join(n for n in (start.note, stop.note) if n) or self.meter.reason or "unavailable"
            return self._invalid(name, start, stop, why, host_joules=host_joules, host_method=host and host.method)
        per_device = {d: stop.joules[d] - start.joules[d] for d in stop.joules}
        if any(v < 0 for v in per_device.values()):
            return self._invalid(name, start, stop, "energy counter went backwards (driver reload?)")
        total = sum(per_device.values())
        if self.method in ("nvml-counter", "nvml-mixed") and total == 0 and seconds < self.counter_resolution_s:
            return self._invalid(
                name, start, stop, f"window of {seconds * 1e3:.0f} ms is below the counter's update period"
            )
        notes = []
        if self.method.startswith("nvml-") and seconds < self.min_window_s:
            notes.append(
                f"short window ({seconds:.2f} s < {self.min_window_s:g} s): NVML updates every ~0.1 s, expect error"
            )
        if stop.errors > start.errors:
            notes.append(f"{stop.errors - start.errors} NVML read(s) failed in this window and were bridged")
        # What changed on the devices since the sample before this window's start, to its end.
        notes += [e["note"] for e in self.meter.events[start.events - start.new_events : stop.events]]
        note = "; ".join(notes)
        uncertainty = self.meter.uncertainty(seconds, total, start, stop)
        return WindowReading(
            name, start.time, seconds, total, per_device, self.method, True, note, start, stop, uncertainty
        )


@dataclasses.dataclass(frozen=True)
class IdleBaseline:
    """Idle power measured before a study; ``watts`` is ``None`` when it could not be measured."""

    watts: float | None
    seconds: float
    method: str
    note: str = ""


def measure_idle(monitor: EnergyMonitor, seconds: float = 3.0) -> IdleBaseline:
    """Average power over ``seconds`` of doing nothing (after all pending JAX work finished); at
    least the meter's resolution (a 0.1 s window of a 100 ms counter would read 0 W)."""
    if (
        monitor.method == "estimated"
    ):  # process CPU time is ~0 while idle: a "0 W" would be a guess shown as a measurement
        return IdleBaseline(
            None,
            0.0,
            "estimated",
            "not applicable: the estimate counts this process's CPU time, which is ~0 while idle",
        )
    for array in jax.live_arrays():
        array.block_until_ready()
    window = monitor.begin("idle")
    time.sleep(max(seconds, monitor.resolution_s))
    reading = monitor.end(window)
    if reading.joules is None or reading.seconds <= 0:
        return IdleBaseline(None, reading.seconds, reading.method, reading.note)
    return IdleBaseline(reading.joules / reading.seconds, reading.seconds, reading.method)


def hardware_profile(nvml: Any | None = None) -> dict[str, Any]:
    """Devices, memory and power limits (read only: limits are never set here). An NVML error
    makes that figure ``"unavailable"`` (or the GPU list, with ``gpu_note`` saying why), never an
    aborted study; NVML is closed on every path."""
    profile: dict[str, Any] = {
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "gpus": [],
    }
    try:
        profile["host_memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        profile["host_memory_bytes"] = None
    nvml, reason = open_nvml(nvml)
    if nvml is None:
        profile["gpu_note"] = reason
        return profile
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            profile["gpus"].append(_gpu_profile(nvml, i))
    except Exception as err:  # the count itself failed: what was read is kept
        profile["gpu_note"] = f"NVML error while listing GPUs: {err}"
    finally:
        close_nvml(nvml)  # every open is closed
    return profile


def _gpu_profile(nvml: Any, i: int) -> dict[str, Any]:
    """One GPU's name, memory and power limits; each figure NVML cannot give is ``"unavailable"``."""
    gpu: dict[str, Any] = {"index": i}
    try:
        h = nvml.nvmlDeviceGetHandleByIndex(i)
    except Exception as err:
        return {**gpu, "name": "unavailable", "note": f"NVML error: {err}"}
    reads = {
        "name": lambda: text(nvml.nvmlDeviceGetName(h)),
        "memory": lambda: nvml.nvmlDeviceGetMemoryInfo(h),
        "power_limit_w": lambda: nvml.nvmlDeviceGetPowerManagementLimit(h) / 1e3,
        "power_limit_range_w": lambda: [v / 1e3 for v in nvml.nvmlDeviceGetPowerManagementLimitConstraints(h)],
    }
    for key, call in reads.items():
        try:
            value = call()
        except Exception:
            value = "unavailable"
        if key == "memory" and value != "unavailable":
            gpu["memory_total_bytes"], gpu["memory_free_bytes"] = int(value.total), int(value.free)
        else:
            gpu[key] = value
    return gpu
