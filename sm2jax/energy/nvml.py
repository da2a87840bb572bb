"""NVML: the GPUs JAX computes on, found on the node, each metered by the best method it supports.

Finding the card: :mod:`sm2jax.energy.gpus` (the mapping, MIG, identical cards).

Methods per card. A card whose energy counter works (Volta and newer) is read through
``nvmlDeviceGetTotalEnergyConsumption``; one without (a P100, some vGPUs) through polled power,
integrated by the trapezoid rule. One card without a counter does not downgrade the others: the
meter's method is ``nvml-counter``, ``nvml-power`` or ``nvml-mixed`` (each card's in ``devices``).

Errors. A counter read that fails is retried; if it still fails, that sample has no figure and the
windows it bounds are invalid (and say why), never an aborted study. The power poller logs an error
and carries on; a card without a good power reading for longer than the meter's resolution makes
the windows over the gap invalid.

Uncertainty. A counter that updates every ``u`` seconds is read at both ends of a window: each end
may lag by up to ``u``, so a window's energy is off by at most ``u`` times the card's power limit
(the most it can draw), whatever the window's length; polled power that is itself an average over
``a`` seconds lags by up to ``a`` plus the polling interval. :meth:`NvmlMeter.uncertainty` states
that bound relative to the window's energy.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Any

from sm2jax.energy.base import Meter, Sample, UnavailableMeter
from sm2jax.energy.gpus import MappingError, jax_gpus, nvml_handles

log = logging.getLogger(__name__)

COUNTER_UPDATE_S = 0.1
"""How often an NVML energy counter updates (about every 100 ms)."""

POWER_AVERAGE_S = 1.0
"""The window recent GPUs average their reported power over."""

READ_RETRIES = 3
"""Attempts of a counter read before its sample is given up."""


def open_nvml(nvml: Any | None = None) -> tuple[Any | None, str]:
    """Imports (unless given) and initialises NVML; returns ``(module, "")`` or ``(None, reason)``.
    Every successful open is closed by one ``nvmlShutdown`` (NVML counts them)."""
    try:
        if nvml is None:
            import pynvml as nvml  # nvidia-ml-py
    except ImportError:
        return None, "nvidia-ml-py (module pynvml) is not installed"
    try:
        nvml.nvmlInit()
    except Exception as err:
        return None, f"NVML unavailable: {err}"
    try:
        count = nvml.nvmlDeviceGetCount()
    except Exception as err:
        count, reason = 0, f"NVML unavailable: {err}"
    else:
        reason = "NVML found no GPU"
    if count < 1:
        try:
            nvml.nvmlShutdown()  # the init above is closed on every path
        except Exception:
            pass
        return None, reason
    return nvml, ""


def close_nvml(nvml: Any) -> None:
    """One ``nvmlShutdown`` for one successful :func:`open_nvml`; an error is logged, never raised."""
    try:
        nvml.nvmlShutdown()
    except Exception as err:
        log.warning("nvmlShutdown failed: %s", err)


@dataclasses.dataclass
class _Card:
    key: str
    handle: Any
    method: str  # nvml-counter or nvml-power
    power_limit_w: float | None


class _PowerPoller:
    """Integrates polled power (mW) of some cards in a thread, trapezoid rule; errors are logged
    and bridged, never fatal."""

    def __init__(self, nvml: Any, cards: list[_Card], interval_s: float):
        self.nvml, self.cards, self.interval_s = nvml, cards, interval_s
        self._lock = threading.Lock()
        now = time.perf_counter()
        self.energy = {c.key: 0.0 for c in cards}
        self.last: dict[str, tuple[float, float] | None] = {c.key: None for c in cards}  # (time, watts)
        self.good = {c.key: now for c in cards}  # time of the last good read
        self.errors = 0
        self._failing: set[str] = set()
        self.advance()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sm2jax-nvml-power", daemon=True)
        self._thread.start()

    def advance(self) -> None:
        for c in self.cards:
            try:
                watts = self.nvml.nvmlDeviceGetPowerUsage(c.handle) / 1e3
            except Exception as err:
                with self._lock:
                    self.errors += 1
                if c.key not in self._failing:
                    log.warning("NVML power read of %s failed (%s); polling goes on", c.key, err)
                    self._failing.add(c.key)
                continue
            now = time.perf_counter()
            self._failing.discard(c.key)
            with self._lock:
                last = self.last[c.key]
                if last is not None:
                    self.energy[c.key] += 0.5 * (watts + last[1]) * (now - last[0])
                self.last[c.key], self.good[c.key] = (now, watts), now

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.advance()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * self.interval_s + 1)


class NvmlMeter(Meter):
    """The GPUs JAX uses, each read by its energy counter where it works, else by polled power.

    While it meters, every sample reads each card's power limit (the stated uncertainty follows a
    limit another tool changes) and, at most once a second, the processes on each card; a change
    is one of :attr:`events`, and the notes of the windows it falls in say so.

    Args:
      nvml: an opened NVML module (closed with the meter, once).
      handles: :func:`nvml_handles`'s mapping.
      counters: use the energy counter where a card supports it (``False``: poll every card's power).
      interval_s: power polling interval.
    """

    resolution_s = 1.0  # the counter updates about every 100 ms; power is a ~1 s average
    process_check_s = 1.0  # how often the processes on each card are listed

    def __init__(
        self,
        nvml: Any,
        handles: dict[str, tuple[Any, dict[str, Any]]],
        *,
        counters: bool = True,
        interval_s: float = 0.1,
    ):
        self.nvml, self.interval_s = nvml, interval_s
        self.cards, self.devices, self.events = [], [], []
        self._closed = False
        self._pids: dict[str, set[int]] = {}
        for key, (handle, entry) in handles.items():
            method = "nvml-counter" if counters and _counter_works(nvml, handle) else "nvml-power"
            card = _Card(key, handle, method, _power_limit(nvml, handle))
            self.cards.append(card)
            self._pids[key] = _processes(nvml, handle)
            others = sorted(self._pids[key] - {os.getpid()})
            self.devices.append(
                {
                    **entry,
                    "method": method,
                    "power_limit_w": card.power_limit_w,
                    **({"other_pids": others} if others else {}),
                }
            )
        self._checked = time.perf_counter()
        methods = {c.method for c in self.cards}
        self.method = methods.pop() if len(methods) == 1 else "nvml-mixed"
        polled = [c for c in self.cards if c.method == "nvml-power"]
        self.update_s = COUNTER_UPDATE_S if not polled else POWER_AVERAGE_S + interval_s
        notes = []
        if polled and counters:
            notes.append(
                f"energy counter not supported on {', '.join(c.key for c in polled)}: power polled every {interval_s:g} s"
            )
        notes += [f"{d['nvml']}: {d['note']}" for d in self.devices if d.get("note")]
        notes += [
            f"{d['nvml']} is shared with pid(s) {d['other_pids']}: its energy includes theirs"
            for d in self.devices
            if d.get("other_pids")
        ]
        self.reason = "; ".join(notes)
        self._poller = _PowerPoller(nvml, polled, interval_s) if polled else None

    def _event(self, key: str, note: str) -> None:
        log.warning("%s", note)
        self.events.append({"time": time.time(), "device": key, "note": note})

    def _watch(self) -> None:
        """Power limits at every sample; new processes on each card at most once a second."""
        for c in self.cards:
            limit = _power_limit(self.nvml, c.handle)
            if limit is not None and limit != c.power_limit_w:
                self._event(
                    c.key,
                    f"power limit of {c.key} changed from {c.power_limit_w:g} W to {limit:g} W while metering "
                    "(the stated uncertainty follows it)",
                )
                c.power_limit_w = limit
        if time.perf_counter() - self._checked < self.process_check_s:
            return
        self._checked = time.perf_counter()
        for c in self.cards:
            pids = _processes(self.nvml, c.handle)
            new = sorted(pids - self._pids[c.key] - {os.getpid()})
            if new:
                self._event(c.key, f"pid(s) {new} started on {c.key} while metering: its energy includes theirs")
            self._pids[c.key] |= pids

    def _counter(self, card: _Card) -> tuple[float | None, str]:
        err = None
        for attempt in range(READ_RETRIES):
            try:
                return self.nvml.nvmlDeviceGetTotalEnergyConsumption(card.handle) / 1e3, ""
            except Exception as e:
                err = e
                time.sleep(0.01 * (attempt + 1))
        log.warning("NVML energy counter of %s unreadable after %d tries: %s", card.key, READ_RETRIES, err)
        return None, f"{card.key}: counter read failed {READ_RETRIES} times ({err})"

    def _lag_joules(self) -> float | None:
        """The most one end of a window can lag, in joules: each card's lag x its power limit now."""
        if any(c.power_limit_w is None for c in self.cards):
            return None
        lag = {"nvml-counter": COUNTER_UPDATE_S, "nvml-power": POWER_AVERAGE_S + self.interval_s}
        return sum(c.power_limit_w * lag[c.method] for c in self.cards)

    def sample(self) -> Sample:
        """Each card's energy now. A polled card reports power averaged over the last
        ``a = POWER_AVERAGE_S`` seconds: each reading is placed at the middle of its average
        (``a/2`` earlier), and the last ``a/2`` plus the time since the last poll is drawn at the
        last reading, so that a window after a busy -> idle edge is not charged the busy power
        that the average still holds."""
        if self._closed:
            return Sample(time.perf_counter(), None, note="the NVML meter was closed")
        known = len(self.events)
        self._watch()
        joules, notes = {}, []
        for c in self.cards:
            if c.method == "nvml-counter":
                joules[c.key], note = self._counter(c)
                notes += [note] if note else []
        errors, t = 0, time.perf_counter()
        if self._poller is not None:
            self._poller.advance()  # integrate up to now, not to the last poll
            with self._poller._lock:
                errors = self._poller.errors
                now = t = time.perf_counter()
                for c in self._poller.cards:
                    gap, last = now - self._poller.good[c.key], self._poller.last[c.key]
                    if gap > self.resolution_s or last is None:
                        joules[c.key] = None
                        notes.append(f"{c.key}: no good power reading for {gap:.1f} s")
                    else:
                        joules[c.key] = self._poller.energy[c.key] + last[1] * (now - last[0] + POWER_AVERAGE_S / 2)
        valid = all(v is not None for v in joules.values())
        return Sample(
            t,
            joules if valid else None,
            errors=errors,
            note="; ".join(notes),
            events=len(self.events),
            new_events=len(self.events) - known,
            lag_joules=self._lag_joules(),
        )

    def uncertainty(
        self, seconds: float, joules: float | None, start: Sample | None = None, stop: Sample | None = None
    ) -> float | None:
        """The bound of the module docstring relative to ``joules``: ``u`` x the cards' power
        limits (``a`` + polling interval for polled cards), at the larger of the limits read at
        the window's two ends; ``None`` without limits or energy."""
        lags = [s.lag_joules for s in (start, stop) if s is not None and s.lag_joules is not None]
        bound = max(lags) if lags else self._lag_joules()
        if not joules or bound is None:
            return None
        return bound / joules

    def close(self) -> None:
        """Stops the poller and closes NVML; closing again does nothing (one shutdown per open)."""
        if self._closed:
            return
        self._closed = True
        if self._poller is not None:
            self._poller.close()
        close_nvml(self.nvml)


def _power_limit(nvml: Any, handle: Any) -> float | None:
    try:
        return nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1e3
    except Exception:
        return None


def _counter_works(nvml: Any, handle: Any) -> bool:
    for _ in range(READ_RETRIES):
        try:
            nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            return True
        except nvml.NVMLError_NotSupported:
            return False
        except Exception:
            time.sleep(0.01)
    return False


def _processes(nvml: Any, handle: Any) -> set[int]:
    """The pids NVML lists on a card: compute, graphics and MPS processes (each list that cannot
    be read is left out)."""
    pids: set[int] = set()
    for name in (
        "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetGraphicsRunningProcesses",
        "nvmlDeviceGetMPSComputeRunningProcesses",
    ):
        try:
            pids |= {int(p.pid) for p in getattr(nvml, name)(handle)}
        except Exception:
            continue
    return pids


def make_nvml_meter(
    nvml: Any | None = None,
    *,
    prefer: str = "nvml-counter",
    interval_s: float = 0.1,
    gpus: list[dict[str, Any]] | str | None = None,
) -> Meter:
    """The NVML meter of ``gpus`` (default: the GPUs JAX uses, :func:`jax_gpus`; ``"all"``: every
    GPU NVML sees), each card by its counter where it works (``prefer="nvml-power"``: every card's
    polled power). Never raises: a missing library, no GPU in use, a card that cannot be told apart
    or an NVML error gives an :class:`UnavailableMeter` that says why."""
    gpus = jax_gpus() if gpus is None else gpus
    if not gpus:
        return UnavailableMeter("JAX uses no GPU: there is no GPU energy to meter")
    nvml, reason = open_nvml(nvml)
    if nvml is None:
        return UnavailableMeter(reason)
    try:
        return NvmlMeter(nvml, nvml_handles(nvml, gpus), counters=prefer == "nvml-counter", interval_s=interval_s)
    except Exception as err:
        close_nvml(nvml)
        return UnavailableMeter(str(err) if isinstance(err, MappingError) else f"NVML error: {err}")
