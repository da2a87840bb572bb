r"""A study's energy and wall time before it runs, and what each next phase will cost while it runs.

Rates. A cohort's configurations cost the same per step (one vmapped program): a training call
costs its dispatch plus each step of each chunk of vmapped rows, and evaluation costs per trial,
measured from energy windows (:func:`sm2jax.rates.measured_rates`) -- a study's own ledger while it
runs, or a short probe of every cohort before it does (:func:`sm2jax.probe.probe`).

Counts. Exploration trains every trial of every cohort (replicates included). It keeps at most
``ceil(explore_keep * k)`` of a cohort's ``k`` configurations and drops the clearly worse, so the
first rung trains between 1 and :math:`\sum_c \lceil \mathrm{keep} \cdot k_c \rceil`; each later
rung keeps ``ceil(n / eta)`` (``floor`` under Hyperband's rule, at least 1). Which cohorts
survive is unknown before the study runs: a phase's range runs from its fewest trials at the
cheapest cohort's cost to its most at the dearest's, and its middle is the most, spread over the
cohorts as their sizes are.

Range. Every figure is widened by a factor of ``1 + noise`` either way (default noise: the larger
of the spec's ``energy_noise`` and 1, a factor of 2, for timing noise on a shared machine). Between windows, the
study's setup and one checkpoint commit per phase (with its viewers) take what the probe measured
for them (it commits once), between half and twice it, at the power the probe drew between windows. Compilation: what the probe measured when it loaded every program from the persistent
compilation cache; when it compiled, the study loads what it compiled (between a tenth and all of it).

The plan predicts the whole span of the study (first to last energy reading,
:func:`sm2jax.energy.ledger.whole_span`), not the process's start-up (importing JAX, loading data).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from sm2jax.energy.ledger import add_known, sum_known
from sm2jax.rates import CohortRate, Range, _add, format_joules, format_seconds, scaled

DEFAULT_PLAN_NOISE = 1.0
"""The least noise a plan states: a factor of ``1 + noise`` either way (timing on a shared,
loaded machine; on a 2-core CPU, repeated digits studies vary by up to ~1.7x per phase)."""

PROBE_FRACTION = 0.15
"""A probe trains each cohort 1 step, then ``s`` (this share of its first phase's steps, at least
2), then enough to last two meter resolutions (:func:`sm2jax.probe.probe_cohorts`)."""


def test_evals(data: Any) -> float:
    """What testing the selection once costs in validation evaluations: the test split's size over
    the validation split's (0 without a test split)."""
    return len(data.y_test) / len(data.y_val) if data.has_test and len(data.y_val) else 0.0


def keep_count(n: int, eta: int, rule: str = "ceil") -> int:
    """How many of ``n`` a rung keeps (successive halving's ``ceil``, Hyperband's ``floor``)."""
    return max(1, math.ceil(n / eta) if rule == "ceil" else n // eta)


@dataclasses.dataclass(frozen=True)
class CohortPlan:
    """A cohort as the plan sees it: its configurations, replicates and batch size."""

    name: str
    configs: int
    replicates: int
    batch_size: int


def cohort_plans(spec: Any) -> list[CohortPlan]:
    """The cohorts of a :class:`~sm2jax.spec.StudySpec` (without training anything)."""
    from sm2jax.cohort import group_into_cohorts

    configs, replicas = spec.proposals()
    out = []
    for c in group_into_cohorts(configs):
        twins = sum(1 for cfg in c.configs if cfg.trial_id in replicas)
        out.append(CohortPlan(c.name, c.size - twins, twins, c.signature.batch_size))
    return out


@dataclasses.dataclass(frozen=True)
class PhaseCost:
    """One line of a plan: a phase (or ``compile``, ``between windows``), how many trials it
    trains (``None``: not a training phase), its joules (``None``: energy unavailable) and seconds."""

    name: str
    trials: tuple[int, int] | None
    joules: Range | None
    seconds: Range

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trials": None if self.trials is None else list(self.trials),
            "joules": None if self.joules is None else self.joules.to_json(),
            "seconds": self.seconds.to_json(),
        }

    @classmethod
    def from_json(cls, blob: dict[str, Any]) -> PhaseCost:
        return cls(
            blob["name"],
            None if blob["trials"] is None else tuple(blob["trials"]),
            None if blob["joules"] is None else Range(**blob["joules"]),
            Range(**blob["seconds"]),
        )


@dataclasses.dataclass(frozen=True)
class StudyPlan:
    """A study's predicted cost: one :class:`PhaseCost` per line, the method its energy is
    measured by, and notes (how the probe ran)."""

    lines: list[PhaseCost]
    method: str
    noise: float
    notes: list[str] = dataclasses.field(default_factory=list)
    spec_digest: str = ""  # :func:`sm2jax.store.folder.spec_digest` of the spec planned

    def total(self) -> PhaseCost:
        joules: Range | None = Range.zero()
        seconds = Range.zero()
        for line in self.lines:
            joules, seconds = _add(joules, line.joules), seconds + line.seconds
        return PhaseCost("total", None, joules, seconds)

    def first_phase(self) -> PhaseCost:
        """What the study needs before its first decision: compilation and its first phase."""
        first = next(line for line in self.lines if line.trials is not None)
        compile_ = [line for line in self.lines if line.name == "compile"]
        joules, seconds = first.joules, first.seconds
        for line in compile_:
            joules, seconds = _add(joules, line.joules), seconds + line.seconds
        return PhaseCost(f"compile + {first.name}", first.trials, joules, seconds)

    def to_json(self) -> dict[str, Any]:
        return {
            "lines": [line.to_json() for line in self.lines],
            "total": self.total().to_json(),
            "method": self.method,
            "noise": self.noise,
            "notes": self.notes,
            "spec_digest": self.spec_digest,
        }

    @classmethod
    def from_json(cls, blob: dict[str, Any]) -> StudyPlan:
        lines = [PhaseCost.from_json(b) for b in blob["lines"]]
        return cls(lines, blob["method"], blob["noise"], blob["notes"], blob.get("spec_digest", ""))


def predict(
    spec: Any,
    cohorts: Sequence[CohortPlan],
    rates: dict[str, CohortRate],
    steps: Callable[[float, int], int],
    *,
    method: str,
    noise: float = DEFAULT_PLAN_NOISE,
    between: tuple[float, float, float] = (0.0, 0.0, 0.0),
    compiled: bool = False,
    reused: bool = False,
    eval_at_start: bool = False,
    test_evals: float = 1.0,
) -> StudyPlan:
    """The plan of ``spec`` (see the module docstring) from each cohort's measured ``rates``.

    Args:
      cohorts: :func:`cohort_plans`.
      steps: ``steps(cumulative_budget, batch_size)``: a budget in training steps.
      method: how the rates' energy was measured (the plan's label).
      noise: the relative noise every figure is widened by.
      between: the time between windows, ``(setup_seconds, seconds_per_phase, watts)``: the
        study's setup, each phase's commit (checkpoint, viewers), at the probe's power between
        windows.
      compiled: the probe compiled its programs (the study will load them from the cache).
      reused: the study builds its programs from memory (the rates' compilation is a rebuild's).
      eval_at_start: exploration also evaluates the untrained models (tasks without a majority class).
      test_evals: the test split's size over the validation split's (the selection is tested once).
    """
    if not cohorts:
        raise ValueError("a plan needs at least one cohort")
    missing = [c.name for c in cohorts if c.name not in rates]
    if missing:
        raise ValueError(f"no measured rate for cohort(s) {', '.join(missing)}")
    phases = spec.phases()
    lines = [_compile_line(cohorts, rates, noise, compiled=compiled, reused=reused)]
    previous = 0.0
    for i, ((name, budget), (fewest, most)) in enumerate(zip(phases, trial_counts(spec, cohorts))):
        dsteps = {c.name: steps(budget, c.batch_size) - steps(previous, c.batch_size) for c in cohorts}
        base = eval_at_start and name == "explore"  # the untrained models are evaluated too
        exact = name == "explore" or (i == 0 and fewest == sum(most.values()))
        joules, seconds = phase_range(rates, most, fewest, dsteps, first=i == 0, base=base, exact=exact)
        if i == len(phases) - 1:  # the selection is tested once, in whichever cohort it is
            test = [rates[c].test(test_evals) for c in rates]
            seconds += Range(min(t for _, t in test), sum(t for _, t in test) / len(test), max(t for _, t in test))
            tj = [j for j, _ in test]
            joules = None if joules is None or None in tj else joules + Range(min(tj), sum(tj) / len(tj), max(tj))
        spread = (1.0 / (1.0 + noise), 1.0, 1.0 + noise)
        n_most = sum(most.values())
        trials = (n_most, n_most) if exact else (fewest, n_most)
        lines.append(PhaseCost(name, trials, None if joules is None else joules.scale(*spread), seconds.scale(*spread)))
        previous = budget
    setup, per_phase, watts = between
    gap = setup + per_phase * len(phases)
    seconds = Range(gap, gap, gap).scale(0.5, 1.0, 2.0)
    joules = None if lines[0].joules is None else seconds.scale(watts, watts, watts)
    lines.append(PhaseCost("between windows", None, joules, seconds))
    return StudyPlan(lines, method, noise)


def _compile_line(
    cohorts: Sequence[CohortPlan], rates: dict[str, CohortRate], noise: float, *, compiled: bool, reused: bool
) -> PhaseCost:
    """Compilation: what the probe measured; between a tenth and all of it where the probe compiled
    (the study loads what it compiled), from nothing where the study reuses the programs in memory."""
    comp_j: float | None = 0.0
    comp_s = 0.0
    for c in cohorts:
        comp_j, comp_s = add_known(comp_j, rates[c.name].compile_joules), comp_s + rates[c.name].compile_seconds
    lo, hi = (0.1, 1.0 + noise) if compiled else (1.0 / (1.0 + noise), 1.0 + noise)
    mid = 0.5 if compiled else 1.0
    if reused:  # programs already in memory: their build may cost next to nothing
        lo = 0.0
    joules = None if comp_j is None else Range(comp_j, comp_j, comp_j).scale(lo, mid, hi)
    return PhaseCost("compile", None, joules, Range(comp_s, comp_s, comp_s).scale(lo, mid, hi))


def trial_counts(spec: Any, cohorts: Sequence[CohortPlan]) -> list[tuple[int, dict[str, int]]]:
    """Per phase of ``spec``: the fewest trials it may train in all, and the most per cohort (see
    the module docstring: exploration exact, each rung from 1 to what its rule keeps)."""
    phases = spec.phases()
    most = {c.name: c.configs + c.replicates for c in cohorts}
    fewest = sum(most.values())
    out = []
    for i, (name, _) in enumerate(phases):
        if i > 0 and phases[i - 1][0] == "explore":
            most = {c.name: math.ceil(spec.explore_keep * c.configs) for c in cohorts}
            fewest = 1
        elif i > 0:
            most = _spread(most, keep_count(sum(most.values()), spec.eta, spec.keep_rule))
            fewest = keep_count(fewest, spec.eta, spec.keep_rule)
        elif name != "explore":  # no exploration: every configuration trains to the first rung
            most = {c.name: c.configs for c in cohorts}
            fewest = sum(most.values())
        out.append((fewest, dict(most)))
    return out


def phase_range(
    rates: dict[str, CohortRate],
    most: dict[str, int],
    fewest: int,
    dsteps: dict[str, int],
    *,
    first: bool,
    base: bool,
    exact: bool,
) -> tuple[Range | None, Range]:
    """A phase's joules and seconds: the middle with ``most[c]`` trials of each cohort; the least
    with ``fewest`` trials in the cheapest cohort; the most with every cohort that may be alive
    paying its call and the most trials at the dearest per-trial cost. ``exact``: the counts are
    known (every figure is the middle)."""

    def cost(c: str, m: int) -> tuple[float | None, float]:
        j, s = rates[c].train(m, dsteps[c], first)
        if base:
            j, s = None if j is None else j + scaled(rates[c].eval_joules, m), s + m * rates[c].eval_seconds
        return j, s

    alive = [c for c, m in most.items() if m > 0]
    mids = [cost(c, most[c]) for c in alive]
    mid_s = sum(s for _, s in mids)
    mid_j = sum_known(j for j, _ in mids)
    if exact:
        return (None if mid_j is None else Range(mid_j, mid_j, mid_j)), Range(mid_s, mid_s, mid_s)
    n = sum(most.values())
    lows = [cost(c, fewest) for c in alive]
    calls = [rates[c].train(1, 0, first) for c in alive]  # what each call costs without a step
    per_trial = [(cost(c, 1)[0], cost(c, 1)[1]) for c in alive]
    hi_s = sum(s for _, s in calls) + n * max(s - cs for (_, s), (_, cs) in zip(per_trial, calls))
    seconds = Range(min(s for _, s in lows), mid_s, max(hi_s, mid_s))
    if mid_j is None or any(j is None for j, _ in lows + calls + per_trial):
        return None, seconds
    hi_j = sum(j for j, _ in calls) + n * max(j - cj for (j, _), (cj, _) in zip(per_trial, calls))
    return Range(min(j for j, _ in lows), mid_j, max(hi_j, mid_j)), seconds


def _spread(most: dict[str, int], kept: int) -> dict[str, int]:
    """``kept`` trials spread over cohorts as ``most`` is (largest remainders), at most each's own."""
    total = sum(most.values())
    if total <= kept:
        return dict(most)
    share = {c: n * kept / total for c, n in most.items()}
    out = {c: int(v) for c, v in share.items()}
    for c in sorted(share, key=lambda c: out[c] - share[c])[: kept - sum(out.values())]:
        out[c] += 1
    return out


def format_plan(plan: StudyPlan) -> str:
    """The plan as a table: each line's trials, joules and seconds (middle and range)."""
    label = f" [{plan.method}]" if plan.method not in ("nvml-counter", "nvml-power", "nvml-mixed", "rapl") else ""
    rows = [f"plan (before any training; x/{1 + plan.noise:g} and the range of survivors):{label}"]
    for line in [*plan.lines, plan.total()]:
        trials = (
            ""
            if line.trials is None
            else f"{line.trials[0]}-{line.trials[1]} trials"
            if line.trials[0] != line.trials[1]
            else f"{line.trials[0]} trials"
        )
        j = (
            "energy unavailable"
            if line.joules is None
            else f"{format_joules(line.joules.mid)} ({format_joules(line.joules.lo)} .. {format_joules(line.joules.hi)})"
        )
        s = line.seconds
        rows.append(
            f"  {line.name:<16} {trials:<13} {j:<40} {format_seconds(s.mid)} ({format_seconds(s.lo)} .. {format_seconds(s.hi)})"
        )
    rows += [f"  {n}" for n in plan.notes]
    return "\n".join(rows)


def plan_vs_actual(
    plan: dict[str, Any] | None, by_phase: dict[str, dict[str, Any]], span: dict[str, Any] | None
) -> list[dict[str, Any]] | None:
    """Each line of a stored plan (:meth:`StudyPlan.to_json`) beside what the study measured: a
    phase's (and compilation's) gross windows, the whole span's time between windows and total;
    ``within`` says whether the measurement is inside the stated range (``None``: not measured)."""
    if not plan or not plan.get("lines"):
        return None
    out = []
    between = None if span is None else {"joules": span.get("between_joules"), "seconds": span.get("between_seconds")}
    total = None if span is None else {"joules": span.get("joules"), "seconds": span.get("seconds")}
    for line in [*plan["lines"], plan["total"]]:
        actual = {"between windows": between, "total": total}.get(line["name"], by_phase.get(line["name"]))
        row = {"name": line["name"], "plan": line, "joules": None, "seconds": None}
        if actual is not None:
            row["joules"], row["seconds"] = actual.get("joules"), actual.get("seconds")
        for key in ("joules", "seconds"):
            want = line[key]
            row[f"{key}_within"] = None if want is None or row[key] is None else want["lo"] <= row[key] <= want["hi"]
        out.append(row)
    return out


def format_plan_vs_actual(rows: list[dict[str, Any]]) -> list[str]:
    """The report's lines of :func:`plan_vs_actual`."""
    lines = ["plan against actual (the plan's middle, its range, and what was measured):"]
    for r in rows:
        p = r["plan"]
        parts = []
        for key, fmt in (("joules", format_joules), ("seconds", format_seconds)):
            want = p[key]
            if want is None:
                parts.append(f"{key}: no plan")
                continue
            got = "not measured" if r[key] is None else fmt(r[key])
            mark = "" if r[f"{key}_within"] is None else " (within)" if r[f"{key}_within"] else " (OUTSIDE)"
            parts.append(f"{fmt(want['mid'])} ({fmt(want['lo'])} .. {fmt(want['hi'])}) -> {got}{mark}")
        lines.append(f"  {r['name']:<16} " + "; ".join(parts))
    return lines
