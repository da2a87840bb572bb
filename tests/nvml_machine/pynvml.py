"""The NVML test double installed as the machine's ``pynvml``: put this folder first on PYTHONPATH.

Two cards whose energy counters advance with wall time at 150 W and step every 100 ms, like real
ones. ``PYTHONPATH=tests/nvml_machine python -m pytest`` runs the whole suite as if on a machine with
NVIDIA GPUs (that JAX, on the CPU backend, does not compute on).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from fake_nvml import make_card, make_fake_nvml

_module = make_fake_nvml([make_card(0, power_mw=150_000), make_card(1, power_mw=150_000)])
globals().update({k: v for k, v in vars(_module).items() if not k.startswith("__")})
