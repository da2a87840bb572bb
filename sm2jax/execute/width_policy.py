r"""The width and quick-program policy: numbers in, decision out (no training, no clock).

:class:`~sm2jax.execute.runner.CohortRunner` measures (compile seconds, seconds per step, FLOPs, memory)
and carries out what these functions decide; every decision is recorded with its reason.

1. **Start** (:func:`start_widths`). On accelerators, the widest width ``min(K, max_width)``,
   halving until its training program fits in the memory limit (XLA's own memory analysis): one
   small model cannot fill a GPU, and padding rows cost almost nothing there. On a CPU backend,
   width 1: a W-wide step costs about W single steps there (vmapping only amortises dispatch, which
   the in-program step loop already does), width 1 compiles fastest, and survivors never need a
   narrower program. Nothing fits: the cohort is infeasible.
2. **Probe only when it pays** (:func:`probe_decision`). After the first training window the
   cohort's remaining training time is predicted as :math:`T = S \cdot t_W / W` (``S`` planned
   trial-steps, ``t_W`` the measured seconds per step of a W-wide chunk; a program's first call,
   whose one-time costs are not training, runs one step alone and is left out of ``t_W``). Probing
   compiles the other candidates (:func:`probe_candidates`), each costing about the current
   program's measured compile time :math:`c_W`. It runs only if
   :math:`T > \text{payoff} \cdot (n c_W + c_{\text{eval}})` for ``n`` new programs
   (:meth:`WidthPolicy.probe_payoff`); otherwise the start stays.
3. **Narrow for survivors only when it pays** (:func:`narrowing`). With ``K' < W`` survivors the
   padded chunk still costs ``t_W`` per step. Candidates are ``w = K'`` (no padding) and every
   narrower width the probe measured; the one with the largest net saving
   :math:`S' (\lceil K'/W \rceil t_W - \lceil K'/w \rceil t_w) - c_w` is compiled if that is
   positive (``t_w`` measured, else :math:`t_W w / W`).
4. **Out of memory at run time** halves the width and retries the window.

Quick programs (CPU backends, :data:`sm2jax.execute.programs.QUICK_COMPILE`). Before any training program is
compiled, the cohort's training time is predicted from FLOPs (:func:`quick_start`):

.. math::  \hat T = S \cdot 3 F_{\text{fwd}} B \,/\, (n \cdot \text{CPU\_FLOPS\_PER\_DEVICE})

(:math:`F_{\text{fwd}}` one example's forward FLOPs from XLA's cost analysis of the evaluation
program, backward ~2 forwards, ``n`` devices), and the cohort starts quick only if
:math:`\hat T (s - 1) <` :data:`QUICK_COMPILE_SAVING` (``s`` = :data:`QUICK_SLOWDOWN`). Should it
train longer than predicted, the optimised program is compiled once the measured remaining training
makes the saving :math:`T (1 - 1/s)` exceed its predicted compile time :math:`r \cdot c_q`
(:func:`optimise_decision`; ``r`` = :data:`OPTIMISED_COMPILE_RATIO`).

With several devices every width is a multiple of the device count, and "width 1" above means one
row per device. Measured figures behind the constants are in the README (*Compilation*) and
``experiments/bench/compile_time.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax

QUICK_SLOWDOWN = 2.2
"""How much slower a quick training program steps than the optimised one: above the worst measured,
so that both decisions lean to the optimised program."""

OPTIMISED_COMPILE_RATIO = 2.0
"""How much longer the optimised training program takes to compile than the quick one: the upper
end of what was measured, so that a switch is never taken for a gain it cannot pay."""

QUICK_COMPILE_SAVING = 0.3
"""Seconds a quick training program saves in compilation: the least measured on small models."""

CPU_FLOPS_PER_DEVICE = 1e10
"""Training FLOP/s of one CPU host device for the quick-start prediction: below what was measured,
so that training predicted short is short."""

PROBE_CALL_SECONDS = 0.2
"""How long each timed probe call lasts: long enough that dispatch and timer noise do not decide,
short next to the training it steers."""


def probe_candidates(width: int) -> list[int]:
    """Widths the probe measures for a ``width``-wide cohort: 1, the powers of four below it, and it."""
    return sorted({1, *(4**i for i in range(1, 8) if 4**i < width), width})


@dataclasses.dataclass(frozen=True)
class WidthPolicy:
    """How a runner chooses its width (see the module docstring).

    Attributes:
      max_width: cap on the width (``None``: all trials).
      memory_limit: bytes a program may need (``None``: no check).
      probe: allow measuring narrower widths.
      narrow: allow a narrower program for fewer survivors (off in a multi-process study, whose
        processes must take the same decision and do not share a clock).
      start: ``narrowest`` (width 1, probing wider widths), ``widest`` (the widest that fits,
        probing narrower ones) or ``auto``: narrowest on CPU backends, widest on accelerators.
      quick: start with quick training programs on a CPU backend, switching to the optimised one
        when it pays (off in a multi-process study, for the same reason as ``narrow``).
      payoff: the probe runs only when predicted training time exceeds ``payoff`` times its
        predicted compile time (``None``: 5 from a wide start, where a probe that finds nothing
        costs at most a fifth of the training it steers; 10 from width 1 on a CPU, where the best
        width gains little).
    """

    max_width: int | None = None
    memory_limit: int | None = None
    probe: bool = True
    narrow: bool = True
    payoff: float | None = None
    start: str = "auto"
    quick: bool = True

    def __post_init__(self):
        if self.start not in ("auto", "narrowest", "widest"):
            raise ValueError(f"width start: unknown {self.start!r}; known: auto, narrowest, widest")

    def starts_narrow(self) -> bool:
        """``auto``: narrowest on a CPU backend, widest on accelerators (see the module docstring)."""
        return self.start == "narrowest" or (self.start == "auto" and jax.default_backend() == "cpu")

    def starts_quick(self) -> bool:
        """Whether cohorts start with quick programs: only on a CPU backend (XLA's options there)."""
        return self.quick and jax.default_backend() == "cpu"

    def fits(self, need: float | None) -> bool:
        """Whether a program needing ``need`` bytes (``None``: unknown) fits the memory limit."""
        return self.memory_limit is None or need is None or need <= self.memory_limit

    def probe_payoff(self) -> float:
        return self.payoff if self.payoff is not None else 10.0 if self.starts_narrow() else 5.0

    def widest(self, k: int, round_width: Callable[[int], int]) -> int:
        return round_width(min(self.max_width or k, k))


def start_widths(widest: int, devices: int, narrow: bool, round_width: Callable[[int], int]) -> list[int]:
    """Widths to try at the start, in order (the first that fits is taken): one row per device
    when starting narrow, else the widest, halving."""
    if narrow:
        return [devices]
    return sorted({round_width(widest // 2**i) for i in range(widest.bit_length())}, reverse=True)


def quick_start(planned_trial_steps: float, forward_flops: float, batch_size: int, devices: int) -> tuple[bool, float]:
    """``(start quick, predicted training seconds)`` from FLOPs (module docstring)."""
    predicted = planned_trial_steps * 3.0 * forward_flops * batch_size / (CPU_FLOPS_PER_DEVICE * devices)
    return predicted * (QUICK_SLOWDOWN - 1.0) < QUICK_COMPILE_SAVING, predicted


def predicted_training(planned_trial_steps: float, step_seconds: float, width: int) -> float:
    """Seconds of training left, :math:`S \\cdot t_W / W`."""
    return planned_trial_steps * step_seconds / width


def optimise_decision(predicted_s: float, quick_compile_s: float) -> tuple[bool, float, float]:
    """``(switch to the optimised program, predicted saving, predicted compile cost)``."""
    saving = predicted_s * (1.0 - 1.0 / QUICK_SLOWDOWN)
    cost = OPTIMISED_COMPILE_RATIO * quick_compile_s
    return saving > cost, saving, cost


def probe_widths(width: int, widest: int, devices: int) -> list[int]:
    """The other widths a probe from ``width`` would measure (multiples of the device count, up to
    ``widest``)."""
    n = devices
    return [n * c for c in probe_candidates(max(width, widest) // n) if n * c != width and n * c <= widest]


def probe_decision(
    predicted_s: float, new_programs: int, train_compile_s: float, eval_compile_s: float, payoff: float
) -> tuple[bool, float]:
    """``(probe, predicted compile cost)``: probing pays when the predicted training exceeds
    ``payoff`` times the compile time of the programs it needs."""
    cost = train_compile_s * new_programs + eval_compile_s
    return predicted_s > payoff * cost, cost


def probe_steps(step_seconds: float, width: int, widths: list[int]) -> dict[int, int]:
    """Steps per timed call for each width, predicted from the current width's step as if cost grew
    with the width, so that each call lasts about :data:`PROBE_CALL_SECONDS` (a fixed count would
    make a wide call many times longer than a narrow one)."""
    return {c: max(3, int(PROBE_CALL_SECONDS / (step_seconds * c / width))) for c in widths}


def narrowing(
    k: int,
    width: int,
    step_seconds: dict[int, float],
    planned_trial_steps: float,
    compile_cost: Callable[[int], float],
    round_width: Callable[[int], int],
) -> tuple[int, float, float]:
    """``(width, predicted saving, compile cost)`` of the best width for ``k`` survivors of a
    ``width``-wide cohort: exactly ``k`` rows (no padding) or a narrower width already measured.
    Narrow only when the saving exceeds the cost (``compile_cost(c)``: seconds to compile what width
    ``c`` lacks)."""
    t_w = step_seconds[width]
    steps_each = planned_trial_steps / k

    def outcome(c: int) -> tuple[float, float, float]:
        t_c = step_seconds.get(c, t_w * c / width)
        saving = steps_each * (math.ceil(k / width) * t_w - math.ceil(k / c) * t_c)
        cost = compile_cost(c)
        return saving - cost, saving, cost

    options = sorted({round_width(k), *(c for c in step_seconds if c < width)})
    best = max(options, key=lambda c: (outcome(c)[0], c))
    _, saving, cost = outcome(best)
    return best, saving, cost
