"""What every energy meter is: a cumulative :class:`Sample` per device, labelled with its method
(:class:`Meter`), and the meter of nothing (:class:`UnavailableMeter`). The meters themselves live
in :mod:`sm2jax.energy.meters` (RAPL, the estimate, the multi-process meter) and
:mod:`sm2jax.energy.nvml` (GPUs)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Sample:
    """A cumulative reading: joules per device (``None`` if unreadable) at ``time`` (perf_counter);
    ``host``: the host meter's cumulative joules when the accelerator itself cannot be metered."""

    time: float
    joules: dict[str, float] | None
    host: float | None = None
    errors: int = 0  # read errors the meter survived so far (cumulative)
    note: str = ""  # why ``joules`` is ``None``, when it is
    events: int = 0  # how many of the meter's :attr:`Meter.events` had happened by then
    new_events: int = 0  # how many of them this sample found (they happened since the last one)
    lag_joules: float | None = None  # the most a reading can lag, in joules, at the cards' limits then


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
    events: Sequence[dict[str, Any]] = ()  # what changed on the metered devices while metering

    def sample(self) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Releases threads or library handles."""

    def uncertainty(
        self, seconds: float, joules: float | None, start: Sample | None = None, stop: Sample | None = None
    ) -> float | None:
        """Relative error bound of a ``seconds``-long window's ``joules`` (``None``: no stated
        bound) between samples ``start`` and ``stop``: the update period over the window's length,
        by default."""
        return None if self.update_s is None or seconds <= 0 else self.update_s / seconds

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
