"""Which NVML device each GPU JAX computes on is (never a wrong card).

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
"""

from __future__ import annotations

import os
import re
from typing import Any


def text(value: Any) -> str:
    """A string NVML returned (bytes in older bindings)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def normalise_bus_id(bus: Any) -> str:
    """A PCI bus id as NVML writes it (``00000000:17:00.0``): CUDA and JAX may write the domain
    with 4 digits and in lower case."""
    written = text(bus).strip().upper()
    domain, sep, rest = written.partition(":")
    return f"{int(domain, 16):08X}:{rest}" if sep and re.fullmatch(r"[0-9A-F]+", domain) else written


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
        matches = [h for h in _all(nvml) if text(nvml.nvmlDeviceGetUUID(h)).startswith(uuid)]
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
    names = [text(nvml.nvmlDeviceGetName(h)) for h in handles]
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
