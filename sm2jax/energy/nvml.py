"""NVML: the GPUs JAX computes on, found on the node, each metered by the best method it supports.

Finding the card. NVML numbers GPUs in PCI bus order and ignores ``CUDA_VISIBLE_DEVICES``, while
CUDA (and so JAX) numbers them fastest first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``. A JAX device
is matched, in order of preference, by the PCI bus id JAX reports; by the UUID (or UUID prefix)
that ``CUDA_VISIBLE_DEVICES`` names for it; by the index it names, or its CUDA ordinal, which is
NVML's index in PCI bus order (and, in practice, on a node of identical cards) -- on a node whose
cards differ and without ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` the card is found by the device's kind
(its name): the only card of that kind, or the n-th where it is the n-th CUDA device of that kind
and the process sees every device before it; when that cannot decide, the GPU is not metered and
says why (never a wrong card). Each mapping says how it was found (``by``).

MIG. A MIG instance (named by ``CUDA_VISIBLE_DEVICES``, or found on a GPU in MIG mode, as when JAX
reports the parent's bus id, or Kubernetes shows one instance) is not metered: NVML reads only the
whole GPU, which every instance shares, and two studies on two slices would each claim it all.

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
import re
import threading
import time
from typing import Any

from sm2jax.energy.base import Meter, Sample, UnavailableMeter

log = logging.getLogger(__name__)

COUNTER_UPDATE_S = 0.1
"""How often an NVML energy counter updates (about every 100 ms)."""

POWER_AVERAGE_S = 1.0
"""The window recent GPUs average their reported power over."""

READ_RETRIES = 3
"""Attempts of a counter read before its sample is given up."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def normalise_bus_id(bus: Any) -> str:
    """A PCI bus id as NVML writes it (``00000000:17:00.0``): CUDA and JAX may write the domain
    with 4 digits and in lower case."""
    text = _text(bus).strip().upper()
    domain, sep, rest = text.partition(":")
    return f"{int(domain, 16):08X}:{rest}" if sep and re.fullmatch(r"[0-9A-F]+", domain) else text


def _ordinal(device: Any) -> int:
    local = getattr(device, "local_hardware_id", None)
    return int(device.id if local is None else local)  # 0 is a valid ordinal, not a missing one


def _cuda_index(ordinal: int, names: list[str] | None) -> int | None:
    """The CUDA index (over every GPU of the node) of a process's CUDA ordinal, ``None`` where
    ``CUDA_VISIBLE_DEVICES`` names it by UUID."""
    if names is None or ordinal >= len(names):
        return ordinal
    return int(names[ordinal]) if names[ordinal].isdigit() else None


def jax_gpus(devices: list[Any] | None = None, visible: list[Any] | None = None) -> list[dict[str, Any]]:
    """The GPUs among ``devices`` (default: JAX's default device) and what identifies each to NVML:
    ``pci_bus_id`` where JAX exposes it, else the ``uuid`` or ``index`` that ``CUDA_VISIBLE_DEVICES``
    names for its ordinal, else its ``index`` (the CUDA ordinal); with the device's ``kind``, the
    CUDA device ``order`` and, for an index, ``kinds_before``: the kinds of the CUDA indices below
    it, from every GPU this process sees (``visible``, default JAX's local devices; ``None`` for
    one it does not see), which tells which of several cards of its kind it is on a node whose
    cards differ (see the module docstring). Empty when none is a GPU."""
    import jax

    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [v.strip() for v in env.split(",") if v.strip()] if env else None
    order = os.environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST").upper()
    devices = jax.devices()[:1] if devices is None else devices
    seen = [d for d in (jax.local_devices() if visible is None else visible) if d.platform == "gpu"]
    kinds = {}  # CUDA index -> device kind, of every GPU this process sees
    for d in [*seen, *devices]:
        index = _cuda_index(_ordinal(d), names) if d.platform == "gpu" else None
        if index is not None:
            kinds[index] = getattr(d, "device_kind", None)
    out = []
    for d in devices:
        if d.platform != "gpu":
            continue
        entry: dict[str, Any] = {"jax": str(d), "kind": getattr(d, "device_kind", None)}
        bus = getattr(d, "pci_bus_id", None)
        index = _cuda_index(_ordinal(d), names)
        if bus:
            entry["pci_bus_id"], entry["by"] = str(bus), "PCI bus id reported by JAX"
        elif index is None:
            entry["uuid"], entry["by"] = names[_ordinal(d)], "CUDA_VISIBLE_DEVICES UUID"
        else:
            entry["index"], entry["order"] = index, order
            entry["kinds_before"] = [kinds.get(i) for i in range(index)]
            entry["by"] = "CUDA_VISIBLE_DEVICES index" if names is not None else "CUDA ordinal"
        out.append(entry)
    return out


class MappingError(LookupError):
    """Which NVML device a JAX device is cannot be told."""


def _all(nvml: Any) -> list[Any]:
    return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]


def _by_uuid(nvml: Any, uuid: str) -> tuple[Any, str]:
    """The GPU a UUID or UUID prefix names; a MIG instance cannot be metered (:data:`MIG_NOTE`)."""
    if uuid.startswith("MIG-"):
        raise MappingError(f"CUDA_VISIBLE_DEVICES names {uuid}, {MIG_NOTE}")
    try:
        return nvml.nvmlDeviceGetHandleByUUID(uuid), ""
    except nvml.NVMLError:
        matches = [h for h in _all(nvml) if _text(nvml.nvmlDeviceGetUUID(h)).startswith(uuid)]
        if len(matches) != 1:
            raise MappingError(f"CUDA_VISIBLE_DEVICES names {uuid!r}, which matches {len(matches)} GPUs") from None
        return matches[0], "UUID prefix"


MIG_NOTE = (
    "a MIG instance: NVML meters only its whole GPU, whose energy every instance shares, so the "
    "instance is not metered (its host is, on its own line)"
)


def _mig_enabled(nvml: Any, handle: Any) -> bool:
    """Whether a GPU is in MIG mode (then JAX computes on one of its instances)."""
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except Exception:  # not supported (no MIG on this card or driver), or an error: not MIG
        return False
    return int(current) == 1


def _by_index(nvml: Any, gpu: dict[str, Any]) -> tuple[Any, str]:
    """The GPU of a CUDA index: NVML's index in PCI bus order or on a node of identical cards;
    otherwise the card of the device's kind: the only one, or the one whose rank among the cards
    of that kind (PCI order) is the device's rank among the CUDA indices of that kind -- known
    only when this process sees the kinds of every index below it. Never a guess."""
    handles = _all(nvml)
    names = [_text(nvml.nvmlDeviceGetName(h)) for h in handles]
    if gpu.get("order") == "PCI_BUS_ID" or len(set(names)) == 1:
        return nvml.nvmlDeviceGetHandleByIndex(int(gpu["index"])), ""
    kind, before = gpu.get("kind"), gpu.get("kinds_before")
    same = [h for h, n in zip(handles, names) if n == kind]
    if len(same) == 1:
        return same[0], f"device kind: the node's only {kind}"
    if same and before is not None and None not in before and before.count(kind) < len(same):
        return same[before.count(kind)], (
            f"device kind: {kind} number {before.count(kind) + 1} of {len(same)} in CUDA's order "
            "(set CUDA_DEVICE_ORDER=PCI_BUS_ID for an exact mapping)"
        )
    why = (
        f"{len(same)} cards are {kind} and this process does not see which CUDA devices come before it"
        if len(same) > 1
        else f"no card is {kind}"
        if kind
        else "JAX reports no device kind"
    )
    raise MappingError(
        f"cannot tell which GPU {gpu['jax']} is: the node's cards differ ({', '.join(sorted(set(names)))}), "
        f"CUDA numbers them fastest first and {why}; set CUDA_DEVICE_ORDER=PCI_BUS_ID"
    )


def nvml_handles(nvml: Any, gpus: list[dict[str, Any]] | str = "all") -> dict[str, tuple[Any, dict[str, Any]]]:
    """``key -> (handle, entry)``: every device (``"all"``) or the listed ones, each found by
    ``pci_bus_id``, ``uuid`` or ``index``; the key is its PCI bus id (else ``gpuN``), the entry the
    listed one with ``nvml`` (the key) and how it was found.

    Raises:
      MappingError: a listed device cannot be told apart (see the module docstring).
    """
    if gpus == "all":
        found = [(h, {"by": "every GPU NVML sees"}, f"gpu{i}") for i, h in enumerate(_all(nvml))]
    else:
        found = []
        for i, g in enumerate(gpus):
            note = ""
            if "pci_bus_id" in g:
                try:
                    handle = nvml.nvmlDeviceGetHandleByPciBusId(g["pci_bus_id"])
                except nvml.NVMLError:
                    handle = nvml.nvmlDeviceGetHandleByPciBusId(normalise_bus_id(g["pci_bus_id"]))
            elif "uuid" in g:
                handle, note = _by_uuid(nvml, g["uuid"])
            else:
                handle, note = _by_index(nvml, g)
            if _mig_enabled(nvml, handle):
                raise MappingError(f"{g.get('jax', 'the GPU')} runs on {MIG_NOTE}")
            found.append((handle, {**g, **({"note": note} if note else {})}, f"gpu{g.get('index', i)}"))
    out = {}
    for handle, entry, fallback in found:
        try:
            key = normalise_bus_id(nvml.nvmlDeviceGetPciInfo(handle).busId)
        except Exception:
            key = fallback
        out[key] = (handle, {"nvml": key, **entry})
    return out


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
