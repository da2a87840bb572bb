"""An in-process test double of the ``pynvml`` module (nvidia-ml-py) at the hardware boundary.

It implements only the functions sm2jax calls, with the same names, units (mJ, mW, bytes) and error
classes, and lets a test script each device's energy counter and power readings.
"""

from __future__ import annotations

import time
import types

NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_UNKNOWN = 999


class NVMLError(Exception):
    def __init__(self, value):
        super().__init__(value)
        self.value = value


class NVMLError_NotSupported(NVMLError):
    def __init__(self):
        super().__init__(NVML_ERROR_NOT_SUPPORTED)


class FakeDevice:
    """A device whose counter is set by the test, or (``clock_driven``) advances at ``power_mw``
    with wall time, like a real card's counter."""

    def __init__(
        self,
        name="NVIDIA H200",
        energy_mj=0,
        power_mw=100_000,
        counter_supported=True,
        name_as_bytes=False,
        clock_driven=False,
        tick_s=0.0,
        pci_bus_id=None,
        uuid=None,
        counter_errors=0,
        power_errors=0,
        processes=(),
        mig=(),
        graphics=(),
        mps=(),
        name_errors=0,
    ):
        self.name, self._energy_mj = name, energy_mj
        self.clock_driven, self._t0, self.tick_s = clock_driven, time.perf_counter(), tick_s
        self._segments = [(self._t0, power_mw)]  # (from, mW): the card's true power over time
        self.average_s = 0.0  # > 0: power readings average the last ``average_s`` seconds (lag)
        self.pci_bus_id, self.uuid = pci_bus_id, uuid
        self.counter_supported, self.name_as_bytes = counter_supported, name_as_bytes
        self.memory_total, self.memory_free = 141 * 2**30, 140 * 2**30
        self.power_limit_mw, self.power_limit_range_mw = 700_000, (200_000, 700_000)
        # The next ``counter_errors`` counter reads (``power_errors`` power reads; -1: every one) fail
        # with NVML_ERROR_UNKNOWN, as a driver hiccup or a lost GPU does.
        self.counter_errors, self.power_errors = counter_errors, power_errors
        self.processes = list(processes)  # pids computing on the card (another tenant's too)
        self.mig = list(mig)  # UUIDs of MIG instances of this card (then it is in MIG mode)
        self.graphics, self.mps = list(graphics), list(mps)  # graphics and MPS client pids
        self.name_errors = name_errors  # the next name reads that fail (-1: every one)

    def fail(self, kind):
        left = getattr(self, f"{kind}_errors")
        if left:
            setattr(self, f"{kind}_errors", left - 1 if left > 0 else left)
            raise NVMLError(NVML_ERROR_UNKNOWN)

    @property
    def power_mw(self):
        """The card's true power now; setting it changes the power from now on (history kept)."""
        return self._segments[-1][1]

    @power_mw.setter
    def power_mw(self, value):
        self._segments.append((time.perf_counter(), value))

    def true_mj(self, t: float) -> float:
        """The true energy drawn from ``_t0`` to ``t`` (perf_counter time)."""
        total = 0.0
        for (start, mw), (end, _) in zip(self._segments, [*self._segments[1:], (float("inf"), 0)]):
            total += mw * max(0.0, min(t, end) - max(start, self._t0))
        return total

    def reported_power_mw(self) -> float:
        """What NVML reports: the true power, or its average over the last ``average_s`` seconds."""
        if not self.average_s:
            return self.power_mw
        now = time.perf_counter()
        first = self._segments[0][1]
        before = first * max(0.0, self._t0 - (now - self.average_s))  # before t0: the first power
        return (before + self.true_mj(now) - self.true_mj(max(self._t0, now - self.average_s))) / self.average_s

    @property
    def energy_mj(self):
        if self.clock_driven:  # a real card's counter moves only every tick_s (~100 ms)
            elapsed = time.perf_counter() - self._t0
            if self.tick_s:
                elapsed = (elapsed // self.tick_s) * self.tick_s
            return int(self._energy_mj + self.true_mj(self._t0 + elapsed))
        return self._energy_mj

    @energy_mj.setter
    def energy_mj(self, value):
        self._energy_mj = value


class MigDevice:
    """A MIG instance's handle: no energy counter of its own; its parent is the physical GPU."""

    def __init__(self, uuid, parent):
        self.uuid, self.parent = uuid, parent


def jax_gpu(ordinal: int, kind: str | None = None, bus: str | None = None) -> types.SimpleNamespace:
    """What JAX shows of a GPU device (CUDA ordinal, kind, optional PCI bus id): the other side of
    the NVML mapping."""
    return types.SimpleNamespace(
        platform="gpu",
        id=ordinal,
        local_hardware_id=ordinal,
        pci_bus_id=bus,
        device_kind=kind,
        __str__=lambda s: f"cuda:{ordinal}",
    )


def make_card(index: int, **kw) -> FakeDevice:
    """A clock-driven device whose counter steps every 100 ms, with a PCI bus id and UUID."""
    return FakeDevice(
        clock_driven=True,
        tick_s=0.1,
        pci_bus_id=f"00000000:{0x17 + index:02X}:00.0",
        uuid=f"GPU-fake-{index:04d}",
        **kw,
    )


def make_fake_nvml(devices: list[FakeDevice], init_error: Exception | None = None) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = NVMLError
    nvml.NVMLError_NotSupported = NVMLError_NotSupported
    nvml.NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    nvml.devices = devices
    nvml.calls = []
    nvml.count_errors = 0  # the next nvmlDeviceGetCount calls that fail (-1: every one)

    def nvmlInit():
        nvml.calls.append("init")
        if init_error is not None:
            raise init_error

    def nvmlShutdown():
        # NVML counts inits: one shutdown too many fails, and the last one closes the library
        # for every other user in the process (real NVML: NVML_ERROR_UNINITIALIZED).
        if nvml.calls.count("shutdown") >= nvml.calls.count("init"):
            raise NVMLError(1)
        nvml.calls.append("shutdown")

    def nvmlDeviceGetCount():
        if nvml.count_errors:
            nvml.count_errors -= 1 if nvml.count_errors > 0 else 0
            raise NVMLError(NVML_ERROR_UNKNOWN)
        return len(devices)

    def nvmlDeviceGetMigMode(h):
        if isinstance(h, MigDevice):
            raise NVMLError_NotSupported()
        return (1, 1) if h.mig else (0, 0)

    def nvmlDeviceGetTotalEnergyConsumption(h):
        if isinstance(h, MigDevice) or not h.counter_supported:
            raise NVMLError_NotSupported()
        h.fail("counter")
        return h.energy_mj

    def nvmlDeviceGetPowerUsage(h):
        h.fail("power")
        return int(h.reported_power_mw())

    def nvmlDeviceGetName(h):
        h.fail("name")
        return h.name.encode() if h.name_as_bytes else h.name

    def nvmlDeviceGetMemoryInfo(h):
        return types.SimpleNamespace(total=h.memory_total, free=h.memory_free, used=h.memory_total - h.memory_free)

    nvml.nvmlInit = nvmlInit
    nvml.nvmlShutdown = nvmlShutdown
    nvml.nvmlDeviceGetCount = nvmlDeviceGetCount
    nvml.nvmlDeviceGetMigMode = nvmlDeviceGetMigMode
    nvml.nvmlDeviceGetHandleByIndex = lambda i: devices[i]

    def by(attr, value):
        for d in devices:
            if getattr(d, attr) == value:
                return d
        raise NVMLError(13)  # NVML_ERROR_NOT_FOUND

    nvml.nvmlDeviceGetHandleByPciBusId = lambda bus: by("pci_bus_id", bus.decode() if isinstance(bus, bytes) else bus)

    def by_uuid(uuid):
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        for d in devices:
            if uuid in d.mig:
                return MigDevice(uuid, d)
        return by("uuid", uuid)  # exact only, as NVML

    nvml.nvmlDeviceGetHandleByUUID = by_uuid
    nvml.nvmlDeviceGetUUID = lambda h: h.uuid
    nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle = lambda h: h.parent

    def listed(pids):
        return [types.SimpleNamespace(pid=p, usedGpuMemory=0) for p in pids]

    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: listed(h.processes)
    nvml.nvmlDeviceGetGraphicsRunningProcesses = lambda h: listed(h.graphics)
    nvml.nvmlDeviceGetMPSComputeRunningProcesses = lambda h: listed(h.mps)

    def nvmlDeviceGetPciInfo(h):
        if h.pci_bus_id is None:
            raise NVMLError_NotSupported()
        return types.SimpleNamespace(busId=h.pci_bus_id.encode())

    nvml.nvmlDeviceGetPciInfo = nvmlDeviceGetPciInfo
    nvml.nvmlDeviceGetTotalEnergyConsumption = nvmlDeviceGetTotalEnergyConsumption
    nvml.nvmlDeviceGetPowerUsage = nvmlDeviceGetPowerUsage
    nvml.nvmlDeviceGetName = nvmlDeviceGetName
    nvml.nvmlDeviceGetMemoryInfo = nvmlDeviceGetMemoryInfo
    nvml.nvmlDeviceGetPowerManagementLimit = lambda h: h.power_limit_mw
    nvml.nvmlDeviceGetPowerManagementLimitConstraints = lambda h: h.power_limit_range_mw

    def forbidden(*args):
        raise AssertionError("sm2jax must never set power limits")

    nvml.nvmlDeviceSetPowerManagementLimit = forbidden
    return nvml
