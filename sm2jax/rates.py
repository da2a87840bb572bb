"""What a cohort costs, measured from its energy windows: training per call and per step of a chunk
of vmapped rows, its warm-up, evaluation per trial, compilation (:func:`measured_rates`); and the
:class:`Range` every prediction is stated as (:mod:`sm2jax.plan`, :mod:`sm2jax.budget`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from sm2jax.energy.ledger import add_known


@dataclasses.dataclass(frozen=True)
class Range:
    """A prediction: ``mid`` between ``lo`` and ``hi`` (``None`` joules: energy unavailable)."""

    lo: float
    mid: float
    hi: float

    def __add__(self, other: Range) -> Range:
        return Range(self.lo + other.lo, self.mid + other.mid, self.hi + other.hi)

    def scale(self, lo: float, mid: float, hi: float) -> Range:
        return Range(self.lo * lo, self.mid * mid, self.hi * hi)

    def holds(self, value: float) -> bool:
        return self.lo <= value <= self.hi

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def zero(cls) -> Range:
        return cls(0.0, 0.0, 0.0)


def scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _add(a: Range | None, b: Range | None) -> Range | None:
    return None if a is None or b is None else a + b


@dataclasses.dataclass(frozen=True)
class CohortRate:
    r"""What a cohort costs (``None`` joules: unavailable). A phase that trains ``m`` of its
    trials ``s`` steps each costs ``call + s ceil(m / width) step`` to train (the call's dispatch
    and host work, then each step of each chunk of ``width`` rows) and ``m eval`` to evaluate; the cohort's first training call also costs
    its ``warmup`` (loading the program, first allocations), and it compiles once (``compile``)."""

    step_joules: float | None
    step_seconds: float
    eval_joules: float | None
    eval_seconds: float
    call_joules: float | None = 0.0
    call_seconds: float = 0.0
    warmup_joules: float | None = 0.0
    warmup_seconds: float = 0.0
    compile_joules: float | None = 0.0
    compile_seconds: float = 0.0
    width: int = 0  # trials per chunk a step runs (its program's vmap width); 0: each trial alone

    def chunks(self, trials: int) -> int:
        """Chunk-steps of one step of ``trials`` trials: a chunk costs the same however many of its
        rows are live (padding rows step too)."""
        return math.ceil(trials / self.width) if self.width else trials

    def test(self, test_evals: float) -> tuple[float | None, float]:
        """Joules and seconds of testing the selection once (``test_evals``: the test split's size
        over the validation split's)."""
        return scaled(self.eval_joules, test_evals), self.eval_seconds * test_evals

    def train(self, trials: int, steps: int, first: bool = False) -> tuple[float | None, float]:
        """Joules and seconds of one phase that trains ``trials`` trials ``steps`` steps each."""
        if trials <= 0:
            return 0.0, 0.0
        x = steps * self.chunks(trials)
        seconds = self.call_seconds + x * self.step_seconds + (self.warmup_seconds if first else 0.0)
        parts = [self.call_joules, self.step_joules, self.eval_joules] + ([self.warmup_joules] if first else [])
        if any(p is None for p in parts):
            return None, seconds + trials * self.eval_seconds
        joules = self.call_joules + x * self.step_joules + (self.warmup_joules if first else 0.0)
        return joules + trials * self.eval_joules, seconds + trials * self.eval_seconds


def _fit(points: list[tuple[float, float | None, float]]) -> tuple[float | None, float, float | None, float]:
    """``(call_joules, call_seconds, step_joules, step_seconds)`` through ``(steps, joules,
    seconds)`` points by least squares (both >= 0); one point (or one length): all per step."""
    xs = [x for x, _, _ in points]

    def line(ys: list[float]) -> tuple[float, float]:
        if len(set(xs)) < 2:
            return 0.0, sum(ys) / max(sum(xs), 1)
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        if slope <= 0:
            return my, 0.0
        call = my - slope * mx
        return (call, slope) if call >= 0 else (0.0, sum(ys) / sum(xs))

    call_s, step_s = line([s for _, _, s in points])
    if any(j is None for _, j, _ in points):
        return None, call_s, None, step_s
    call_j, step_j = line([j for _, j, _ in points])
    return call_j, call_s, step_j, step_s


def measured_rates(records: Sequence[dict[str, Any]], widths: dict[str, int] | None = None) -> dict[str, CohortRate]:
    """Each cohort's :class:`CohortRate` from ledger records (windows and their trial records).

    Training: one point per phase (its chunk-steps at the cohort's ``widths`` entry, joules and
    seconds; per trial-step where no width is given); the first phase a cohort
    trains in holds its warm-up, so the call and per-step costs are fitted (:func:`_fit`) on the
    later phases where there are any, and the warm-up is what the first phase cost beyond them.
    Evaluation (``eval`` and ``test`` windows): per trial evaluated. Compilation: the sums. A
    cohort without a training window is left out."""
    train: dict[str, dict[str, list]] = {}
    other: dict[str, dict[str, list]] = {}
    for r in records:
        kind, cohort = r.get("kind", ""), r.get("cohort")
        if r["type"] not in ("window", "trial") or kind not in ("train", "eval", "test", "compile"):
            continue
        if kind == "train":
            point = train.setdefault(cohort, {}).setdefault(r["phase"], [0, 0.0, 0.0, set()])
            if r["type"] == "trial":
                point[0] += int(r.get("steps") or 0)
                point[3].add(r["trial_id"])
            else:
                point[1] = add_known(point[1], r["joules"])
                point[2] += r["seconds"]
            continue
        key = "compile" if kind == "compile" else "eval"
        acc = other.setdefault(cohort, {"eval": [0.0, 0.0, 0], "compile": [0.0, 0.0, 0]})[key]
        if r["type"] == "trial":
            acc[2] += 1
        else:
            acc[0], acc[1] = add_known(acc[0], r["joules"]), acc[1] + r["seconds"]
    out = {}
    for cohort, phases in train.items():
        width = (widths or {}).get(cohort) or 0
        points = [
            (p[0] / len(p[3]) * (math.ceil(len(p[3]) / width) if width else len(p[3])), p[1], p[2])
            for p in phases.values()
            if p[0] > 0
        ]
        if not points:
            continue
        first, rest = points[0], points[1:]
        call_j, call_s, step_j, step_s = _fit(rest or points)
        warm_j: float | None = 0.0
        warm_s = 0.0
        if rest:
            warm_s = max(first[2] - call_s - first[0] * step_s, 0.0)
            warm_j = None if None in (first[1], call_j, step_j) else max(first[1] - call_j - first[0] * step_j, 0.0)
        (ej, es, evals), (cj, cs, _) = (other.get(cohort) or {"eval": [0.0, 0.0, 0], "compile": [0.0, 0.0, 0]}).values()
        out[cohort] = CohortRate(
            step_j,
            step_s,
            None if ej is None else ej / evals if evals else 0.0,
            es / evals if evals else 0.0,
            call_j,
            call_s,
            warm_j,
            warm_s,
            cj,
            cs,
            width,
        )
    return out


def format_seconds(seconds: float) -> str:
    return f"{seconds:,.1f} s" if seconds >= 10 else f"{seconds:.2g} s"


def format_joules(joules: float) -> str:
    """Joules for a reader: kWh from 0.1 kWh, else J with two significant digits below 10 J."""
    if joules >= 3.6e5:
        return f"{joules / 3.6e6:.3g} kWh"
    return f"{joules:,.1f} J" if joules >= 10 else f"{joules:.2g} J"
