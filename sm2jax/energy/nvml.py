"""NVML: the GPUs JAX computes on, found on the node, each metered by the best method it supports.

Finding the card. NVML numbers GPUs in PCI bus order and ignores ``CUDA_VISIBLE_DEVICES``, while
CUDA (and so JAX) numbers them fastest first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``. A JAX device
is matched, in order of preference, by the PCI bus id JAX reports; by the UUID (or UUID prefix, or
MIG instance, metered through its parent GPU) that ``CUDA_VISIBLE_DEVICES`` names for it; by the
index it names, or its CUDA ordinal, which is NVML's index only in PCI bus order -- on a node whose
cards differ and without ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` the card is found by the device's kind
(its name) instead, and when that cannot decide, the GPU is not metered (never a guess). Each
mapping says how it was found (``by``).

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

from sm2jax.energy.meters import Meter, Sample, UnavailableMeter

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


def jax_gpus(devices: list[Any] | None = None) -> list[dict[str, Any]]:
    """The GPUs among ``devices`` (default: JAX's default device) and what identifies each to NVML:
    ``pci_bus_id`` where JAX exposes it, else the ``uuid`` or ``index`` that ``CUDA_VISIBLE_DEVICES``
    names for its ordinal, else its ``index`` (the CUDA ordinal); with the device's ``kind`` and the
    CUDA device ``order`` for an index (see the module docstring). Empty when none is a GPU."""
    import jax

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [v.strip() for v in visible.split(",") if v.strip()] if visible else None
    order = os.environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST").upper()
    out = []
    for d in jax.devices()[:1] if devices is None else devices:
        if d.platform != "gpu":
            continue
        entry: dict[str, Any] = {"jax": str(d), "kind": getattr(d, "device_kind", None)}
        bus = getattr(d, "pci_bus_id", None)
        local = getattr(d, "local_hardware_id", None)
        ordinal = int(d.id if local is None else local)  # 0 is a valid ordinal, not a missing one
        if bus:
            entry["pci_bus_id"], entry["by"] = str(bus), "PCI bus id reported by JAX"
        elif names is not None and ordinal < len(names) and not names[ordinal].isdigit():
            entry["uuid"], entry["by"] = names[ordinal], "CUDA_VISIBLE_DEVICES UUID"
        else:
            index = int(names[ordinal]) if names is not None and ordinal < len(names) else ordinal
            entry["index"], entry["order"] = index, order
            entry["by"] = "CUDA_VISIBLE_DEVICES index" if names is not None else "CUDA ordinal"
        out.append(entry)
    return out


class MappingError(LookupError):
    """Which NVML device a JAX device is cannot be told."""


def _all(nvml: Any) -> list[Any]:
    return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]


def _by_uuid(nvml: Any, uuid: str) -> tuple[Any, str]:
    """The GPU a UUID, UUID prefix or MIG instance names (a MIG instance: its parent GPU)."""
    old_mig = re.fullmatch(r"MIG-(GPU-[^/]+)/.*", uuid)
    if old_mig:
        return _by_uuid(nvml, old_mig.group(1))[0], "MIG instance: its parent GPU, shared by every instance"
    try:
        handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
    except nvml.NVMLError:
        matches = [h for h in _all(nvml) if _text(nvml.nvmlDeviceGetUUID(h)).startswith(uuid)]
        if len(matches) != 1:
            raise MappingError(f"CUDA_VISIBLE_DEVICES names {uuid!r}, which matches {len(matches)} GPUs") from None
        return matches[0], "UUID prefix"
    if uuid.startswith("MIG-"):
        parent = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
        return parent, "MIG instance: its parent GPU, shared by every instance"
    return handle, ""


def _by_index(nvml: Any, gpu: dict[str, Any], gpus: list[dict[str, Any]]) -> tuple[Any, str]:
    """The GPU of a CUDA index: NVML's index in PCI bus order; otherwise, on a node whose cards
    differ, the card of the device's kind (in PCI order among the cards of that kind)."""
    handles = _all(nvml)
    names = [_text(nvml.nvmlDeviceGetName(h)) for h in handles]
    if gpu.get("order") == "PCI_BUS_ID" or len(set(names)) == 1:
        return nvml.nvmlDeviceGetHandleByIndex(int(gpu["index"])), ""
    kind = gpu.get("kind")
    same = [h for h, n in zip(handles, names) if n == kind]
    peers = [g for g in gpus if g.get("kind") == kind and "index" in g]
    if not same or len(same) < len(peers):
        raise MappingError(
            f"cannot tell which GPU {gpu['jax']} is: the node's cards differ ({', '.join(sorted(set(names)))}) and CUDA numbers them fastest first; set CUDA_DEVICE_ORDER=PCI_BUS_ID"
        )
    return same[
        sorted(g["index"] for g in peers).index(gpu["index"])
    ], "device kind (set CUDA_DEVICE_ORDER=PCI_BUS_ID for an exact mapping)"


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
                handle, note = _by_index(nvml, g, gpus)
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
        if nvml.nvmlDeviceGetCount() < 1:
            nvml.nvmlShutdown()
            return None, "NVML found no GPU"
    except Exception as err:
        return None, f"NVML unavailable: {err}"
    return nvml, ""


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

    Args:
      nvml: an opened NVML module (closed with the meter).
      handles: :func:`nvml_handles`'s mapping.
      counters: use the energy counter where a card supports it (``False``: poll every card's power).
      interval_s: power polling interval.
    """

    resolution_s = 1.0  # the counter updates about every 100 ms; power is a ~1 s average

    def __init__(
        self,
        nvml: Any,
        handles: dict[str, tuple[Any, dict[str, Any]]],
        *,
        counters: bool = True,
        interval_s: float = 0.1,
    ):
        self.nvml, self.interval_s = nvml, interval_s
        self.cards, self.devices = [], []
        for key, (handle, entry) in handles.items():
            method = "nvml-counter" if counters and _counter_works(nvml, handle) else "nvml-power"
            try:
                limit = nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1e3
            except Exception:
                limit = None
            self.cards.append(_Card(key, handle, method, limit))
            self.devices.append({**entry, "method": method, "power_limit_w": limit, **_tenants(nvml, handle)})
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

    def sample(self) -> Sample:
        joules, notes = {}, []
        for c in self.cards:
            if c.method == "nvml-counter":
                joules[c.key], note = self._counter(c)
                notes += [note] if note else []
        t = time.perf_counter()
        errors = 0
        if self._poller is not None:
            self._poller.advance()  # integrate up to now, not to the last poll
            with self._poller._lock:
                errors = self._poller.errors
                now = time.perf_counter()
                for c in self._poller.cards:
                    gap = now - self._poller.good[c.key]
                    stale = gap > self.resolution_s or self._poller.last[c.key] is None
                    joules[c.key] = None if stale else self._poller.energy[c.key]
                    notes += [f"{c.key}: no good power reading for {gap:.1f} s"] if stale else []
                if len(self._poller.cards) == len(self.cards) and not notes:
                    t = max(last[0] for last in self._poller.last.values())  # integrated up to its last read
        valid = all(v is not None for v in joules.values())
        return Sample(t, joules if valid else None, errors=errors, note="; ".join(notes))

    def uncertainty(self, seconds: float, joules: float | None) -> float | None:
        """The bound of the module docstring relative to ``joules``: ``u`` x the cards' power
        limits (``a`` + polling interval for polled cards); ``None`` without limits or energy."""
        if not joules or any(c.power_limit_w is None for c in self.cards):
            return None
        lag = {"nvml-counter": COUNTER_UPDATE_S, "nvml-power": POWER_AVERAGE_S + self.interval_s}
        return sum(c.power_limit_w * lag[c.method] for c in self.cards) / joules

    def close(self) -> None:
        if self._poller is not None:
            self._poller.close()
        try:
            self.nvml.nvmlShutdown()
        except Exception as err:
            log.warning("nvmlShutdown failed: %s", err)


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


def _tenants(nvml: Any, handle: Any) -> dict[str, Any]:
    """Other processes computing on the card (its energy includes theirs), where NVML says."""
    try:
        pids = sorted({int(p.pid) for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)} - {os.getpid()})
    except Exception:
        return {}
    return {"other_pids": pids} if pids else {}


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
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
        return UnavailableMeter(str(err) if isinstance(err, MappingError) else f"NVML error: {err}")
