"""Energy measurement, per-trial attribution and the energy ledger (see the submodules)."""

from sm2jax.energy.base import Meter, UnavailableMeter
from sm2jax.energy.gpus import jax_gpus
from sm2jax.energy.ledger import EnergyLedger, add_known, attribute, read_ledger, summarize, trial_totals
from sm2jax.energy.metering import Metering
from sm2jax.energy.meters import (
    METHODS,
    DistributedMeter,
    EstimateMeter,
    RaplMeter,
    find_rapl_zones,
    make_meter,
)
from sm2jax.energy.monitor import EnergyMonitor, IdleBaseline, WindowReading, hardware_profile, measure_idle
from sm2jax.energy.nvml import NvmlMeter, make_nvml_meter

__all__ = [
    "METHODS",
    "DistributedMeter",
    "EnergyLedger",
    "EnergyMonitor",
    "EstimateMeter",
    "IdleBaseline",
    "Meter",
    "Metering",
    "NvmlMeter",
    "RaplMeter",
    "UnavailableMeter",
    "WindowReading",
    "add_known",
    "attribute",
    "find_rapl_zones",
    "hardware_profile",
    "jax_gpus",
    "make_meter",
    "make_nvml_meter",
    "measure_idle",
    "read_ledger",
    "summarize",
    "trial_totals",
]
