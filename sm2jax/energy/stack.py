"""A study's energy stack, built in one place: meter -> monitor -> ledger -> metering."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import jax

from sm2jax.distributed import barrier, is_primary
from sm2jax.energy.gpus import jax_gpus
from sm2jax.energy.ledger import EnergyLedger
from sm2jax.energy.metering import Metering
from sm2jax.energy.meters import DistributedMeter, make_meter
from sm2jax.energy.monitor import EnergyMonitor, IdleBaseline, hardware_profile, measure_idle


class EnergyStack:
    """The meter of the devices a study computes on, its windows, its ledger and its metering.

    Args:
      method: ``auto`` or a method of :data:`sm2jax.energy.METHODS`.
      devices: the JAX devices of the study's trials axis; this process's GPUs among them are
        metered (none on a CPU backend, where the host is).
      ledger_path: the study's ``ledger.jsonl``.
      nvml: optional NVML module (a test double in tests).
      gpus: the GPUs to meter instead (``"all"`` or ``[{"pci_bus_id" | "uuid" | "index": ...}]``).
      watts_per_core: the ``estimated`` method's power per core.
      carbon_intensity: gCO2e per kWh.
      write: whether this process writes the ledger (process 0 of a multi-process study).
    """

    def __init__(
        self,
        method: str,
        *,
        devices: list[Any],
        ledger_path: str | os.PathLike,
        nvml: Any = None,
        gpus: Any = None,
        watts_per_core: float,
        carbon_intensity: float,
        write: bool = True,
    ):
        self._nvml = nvml
        mine = [d for d in devices if d.process_index == jax.process_index()]
        found = gpus if gpus is not None else jax_gpus(mine)
        self._make = lambda: make_meter(
            method, nvml=nvml, watts_per_core=watts_per_core, gpus=found or None, backend="gpu" if gpus else None
        )
        self._build()
        self.ledger = EnergyLedger(ledger_path, intensity_g_per_kwh=carbon_intensity, write=write)
        self.metering = Metering(self.monitor, self.ledger)

    def _build(self) -> None:
        meter = self._make()
        # Several processes: every process's devices, in every window.
        self.meter = DistributedMeter(meter) if jax.process_count() > 1 else meter
        self.monitor = EnergyMonitor(self.meter)
        self._closed = False
        self._events_done = 0  # meter events already in hardware.json (this attempt)

    @classmethod
    def of(cls, spec: Any, devices: list[Any], ledger_path: str | os.PathLike, **kwargs: Any) -> EnergyStack:
        """The stack a :class:`~sm2jax.spec.StudySpec` asks for (``kwargs``: ``nvml``, ``gpus``);
        only process 0 writes the ledger."""
        return cls(
            spec.energy_method,
            devices=devices,
            ledger_path=ledger_path,
            watts_per_core=spec.watts_per_core,
            carbon_intensity=spec.carbon_intensity,
            write=is_primary(),
            **kwargs,
        )

    @property
    def method(self) -> str:
        return self.meter.method

    def measure_hardware(self, idle_seconds: float) -> dict[str, Any]:
        """What ``hardware.json`` holds: the hardware profile, the metered devices, the meter's
        method and resolution, and the idle baseline (measured over ``idle_seconds``; 0 skips it)."""
        if idle_seconds > 0:
            idle = measure_idle(self.monitor, idle_seconds)
        else:
            idle = IdleBaseline(None, 0.0, self.meter.method, "idle baseline not measured (idle_seconds = 0)")
        return {
            "profile": hardware_profile(self._nvml),
            "energy_method": self.meter.method,
            "energy_note": self.meter.reason,
            "metered_devices": self.meter.devices,
            "resolution_s": self.meter.resolution_s,
            "idle": dataclasses.asdict(idle),
            "host_method": getattr(getattr(self.meter, "host", None), "method", None),
        }

    def open(self) -> list[dict[str, Any]]:
        """Before a run appends: opens the meter again if a run closed it (``run()`` again on the
        same study, after Ctrl-C), repairs the ledger (see :meth:`EnergyLedger.open`) and starts
        the metering's attempt. Returns the ledger's damage."""
        if self._closed:
            self._build()
            self.metering.monitor = self.monitor
        damage = self.ledger.open()
        self.metering.start()
        self._events_done = 0
        return damage

    def events(self) -> list[dict[str, Any]]:
        """What changed on the metered devices during this attempt (power limits, new processes)."""
        return list(self.meter.events)

    def hardware_record(self, folder: Any, measure: bool, idle_seconds: float) -> dict[str, Any]:
        """A study's ``hardware.json`` (``folder``: its :class:`~sm2jax.store.folder.StudyDir`):
        measured (the idle baseline, over ``idle_seconds``) on a first start, read back on a resume;
        one that cannot be read is measured again, with a warning. Its idle baseline is used."""
        if not measure:
            try:
                hardware = folder.read_hardware()
                self.use_hardware(hardware)
                return hardware
            except (ValueError, KeyError, TypeError) as err:
                warnings.warn(
                    f"{folder.hardware_path} cannot be read ({err}); measuring it again", RuntimeWarning, stacklevel=3
                )
        folder.write_hardware(self.measure_hardware(idle_seconds))
        barrier("sm2jax-hardware")
        hardware = folder.read_hardware()
        self.use_hardware(hardware)
        return hardware

    def record_events(self, folder: Any, attempt: int, hardware: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Adds what changed on the metered devices during this attempt and is not recorded yet (a
        power limit, a new process) to ``folder``'s ``hardware.json`` (``meter_events``), each with
        its ``attempt``; returns the hardware record with them (``hardware``: the one read at the
        start)."""
        events = self.events()[self._events_done :]
        if not events or not is_primary():
            return hardware
        try:
            hardware = folder.read_hardware()
            hardware["meter_events"] = [*hardware.get("meter_events", []), *({**e, "attempt": attempt} for e in events)]
            folder.write_hardware(hardware)
            self._events_done += len(events)
        except (OSError, ValueError) as err:
            warnings.warn(f"the meter's events were not added to hardware.json ({err})", RuntimeWarning, stacklevel=2)
        return hardware

    def use_hardware(self, hardware: dict[str, Any]) -> None:
        """Takes the idle baseline of a study's ``hardware.json`` for net energy."""
        self.ledger.idle = IdleBaseline(**hardware["idle"])

    def close(self) -> None:
        """Closes the meter (once; :meth:`open` opens a new one)."""
        if not self._closed:
            self._closed = True
            self.meter.close()
