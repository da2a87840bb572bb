"""A study's energy and wall-time budget: what is spent, what the next phase will cost, and whether
it may start (``StudySpec.max_energy_joules`` and ``max_wall_seconds``; see :mod:`sm2jax.plan`).

:func:`spent_so_far` and :func:`stop_reason` are pure (ledger records in, a reason out);
:class:`StudyBudget` feeds them a running study's ledger and span.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

from sm2jax.energy.ledger import add_known
from sm2jax.plan import DEFAULT_PLAN_NOISE, StudyPlan, phase_range
from sm2jax.rates import CohortRate, Range, format_joules, measured_rates


@dataclasses.dataclass(frozen=True)
class Spent:
    """A study's whole span so far (``joules`` ``None``: unavailable) and, of this attempt, the
    host work between windows per committed phase and the power drawn then."""

    joules: float | None
    seconds: float
    between_seconds: float
    between_watts: float


def spent_so_far(
    records: Sequence[dict[str, Any]],
    attempt: int,
    now: tuple[float | None, float],
    windows: tuple[float | None, float],
    phases_done: int,
) -> Spent:
    """What a study spent: every earlier attempt's whole span (its ``span`` record; one killed
    before it wrote one, by its windows: a lower bound) and this ``attempt``'s span up to ``now``
    (joules, seconds), of which its ``windows`` (joules, seconds); the rest, per phase done, is
    what each next phase adds for its host work."""
    joules: float | None = 0.0
    seconds = 0.0
    spans = {r["attempt"]: r for r in records if r["type"] == "span" and r["attempt"] != attempt}
    for r in records:
        if r["type"] == "window" and r.get("attempt") not in spans and r.get("attempt") != attempt:
            joules, seconds = add_known(joules, r["joules"]), seconds + r["seconds"]
    for r in spans.values():
        joules, seconds = add_known(joules, r["joules"]), seconds + r["seconds"]
    joules, seconds = add_known(joules, now[0]), seconds + now[1]
    gap_s = max(now[1] - windows[1], 0.0)
    gap_j = None if now[0] is None or windows[0] is None else max(now[0] - windows[0], 0.0)
    watts = gap_j / gap_s if gap_j is not None and gap_s > 0 else 0.0
    return Spent(joules, seconds, gap_s / max(phases_done, 1), watts)


def phase_check(
    records: Sequence[dict[str, Any]],
    spent: Spent,
    caps: tuple[float | None, float | None],
    phase: str,
    alive: dict[str, int],
    delta_steps: dict[str, int],
    *,
    last: bool,
    noise: float,
    test_evals: float = 1.0,
    widths: dict[str, int] | None = None,
) -> dict[str, Any] | None:
    """Whether ``phase`` -- ``alive`` trials per cohort, each ``delta_steps`` more -- may start: the
    upper end of its predicted cost (:func:`next_phase_cost`, at the rates of ``records``, with the
    host work of the commit still to come before it) against what is left of each cap (``caps``:
    joules, seconds). Returns the check (``phase``, what was spent, the predicted ``joules`` and
    ``seconds`` ranges, the caps, and ``reason``: why it must not start, ``None`` when it fits);
    ``None`` when nothing is capped or a cohort has no rate to predict from."""
    if caps == (None, None) or not alive:
        return None
    rates = measured_rates(records, widths)
    if any(c not in rates for c in alive):
        return None
    # Two phases' host work: the commit of the phase just decided (not yet made) and the next's.
    joules, seconds = next_phase_cost(
        alive,
        rates,
        delta_steps,
        last=last,
        noise=noise,
        between=(2 * spent.between_seconds, spent.between_watts),
        test_evals=test_evals,
    )
    return {
        "phase": phase,
        "spent_joules": spent.joules,
        "spent_seconds": spent.seconds,
        "joules": None if joules is None else joules.to_json(),
        "seconds": seconds.to_json(),
        "max_joules": caps[0],
        "max_seconds": caps[1],
        "reason": over_budget(Budget(caps[0], caps[1], spent.joules, spent.seconds), joules, seconds, phase),
    }


def stop_reason(*args: Any, **kwargs: Any) -> str | None:
    """Why a phase must not start (:func:`phase_check`'s ``reason``), ``None`` when it may."""
    check = phase_check(*args, **kwargs)
    return None if check is None else check["reason"]


@dataclasses.dataclass(frozen=True)
class Budget:
    """What is spent and what a cap allows (``None``: no cap, or spent unknown)."""

    max_joules: float | None
    max_seconds: float | None
    spent_joules: float | None
    spent_seconds: float


def next_phase_cost(
    alive: dict[str, int],
    rates: dict[str, CohortRate],
    delta_steps: dict[str, int],
    *,
    last: bool,
    noise: float,
    between: tuple[float, float] = (0.0, 0.0),
    test_evals: float = 1.0,
) -> tuple[Range | None, Range]:
    """The cost of a phase whose trials are known -- ``alive[cohort]`` trials, each training
    ``delta_steps[cohort]`` more steps and evaluated once (and the selection tested if ``last``)
    -- at the measured ``rates`` widened by ``noise``, plus the host work of one phase
    (``between``: its seconds and watts, between half and twice it). ``None`` joules: a cohort's
    energy rate is unknown."""
    joules, seconds = phase_range(rates, alive, 0, delta_steps, first=False, base=False, exact=True)
    if last:
        tests = [rates[c].test(test_evals) for c in alive]
        seconds += Range(*[max(t for _, t in tests)] * 3)
        tj = [j for j, _ in tests]
        joules = None if joules is None or None in tj else joules + Range(*[max(tj)] * 3)
    spread = (1.0 / (1.0 + noise), 1.0, 1.0 + noise)
    gap_s = Range(*[between[0]] * 3).scale(0.5, 1.0, 2.0)
    gap_j = gap_s.scale(*[between[1]] * 3)
    return (None if joules is None else joules.scale(*spread) + gap_j), seconds.scale(*spread) + gap_s


def over_budget(budget: Budget, joules: Range | None, seconds: Range, phase: str) -> str | None:
    """Why ``phase`` must not start (its predicted upper cost exceeds what is left of a cap), or
    ``None`` when it fits every cap that can be checked."""
    if budget.max_joules is not None and budget.spent_joules is not None and joules is not None:
        left = budget.max_joules - budget.spent_joules
        if joules.hi > left:
            return (
                f"{phase} would need {format_joules(joules.mid)} (up to {format_joules(joules.hi)}) and {format_joules(max(left, 0.0))} of the "
                f"{format_joules(budget.max_joules)} energy budget are left"
            )
    if budget.max_seconds is not None:
        left = budget.max_seconds - budget.spent_seconds
        if seconds.hi > left:
            return (
                f"{phase} would need {seconds.mid:,.0f} s (up to {seconds.hi:,.0f} s) and {max(left, 0.0):,.0f} s "
                f"of the {budget.max_seconds:,.0f} s wall-time budget are left"
            )
    return None


def first_phase_fits(spec: Any, plan: StudyPlan) -> None:
    """Raises one line when ``plan`` says compilation and the first phase need more than a cap of
    ``spec`` (the plan's middle: what it predicts), saying what they need."""
    first = plan.first_phase()
    cap_j, cap_s = spec.max_energy_joules, spec.max_wall_seconds
    if cap_j is not None and first.joules is not None and first.joules.mid > cap_j:
        raise ValueError(
            f"the energy budget ({_kwh(cap_j)}) is below what the plan says {first.name} needs: "
            f"~{_kwh(first.joules.mid)} ({_kwh(first.joules.lo)} .. {_kwh(first.joules.hi)}); "
            f"raise it to at least --budget-kwh {first.joules.hi / 3.6e6:.3g} (`sm2jax plan` shows every phase)"
        )
    if cap_s is not None and first.seconds.mid > cap_s:
        raise ValueError(
            f"the wall-time budget ({cap_s:,.0f} s) is below what the plan says {first.name} needs: "
            f"~{first.seconds.mid:,.0f} s ({first.seconds.lo:,.0f} .. {first.seconds.hi:,.0f} s); "
            f"raise it to at least --budget-hours {first.seconds.hi / 3600:.3g} (`sm2jax plan` shows every phase)"
        )


class StudyBudget:
    """The caps of a study's spec, checked from its ledger and its running span.

    Args:
      spec: the study's spec (its caps may change on resume: they train nothing).
      metering: the study's metering (its ledger and the running attempt's span).
      phases_done: how many phases this attempt has committed (a callable).
    """

    def __init__(self, spec: Any, metering: Any, phases_done: Any):
        self.spec, self.metering, self._phases_done = spec, metering, phases_done
        self._said_unknown = False
        self.checks: list[dict[str, Any]] = []

    @property
    def capped(self) -> bool:
        return self.spec.max_energy_joules is not None or self.spec.max_wall_seconds is not None

    def stop_reason(self, phase: str, alive: dict[str, int], delta_steps: dict[str, int], **kwargs: Any) -> str | None:
        """:func:`stop_reason` for this study now (``kwargs``: ``last``, ``test_evals``, ``widths``)."""
        if not self.capped or not alive:
            return None
        self.metering.flush()
        records = self.metering.ledger.records()
        now, windows_j, windows_s = self.metering.span_so_far()
        spent = spent_so_far(
            records, self.metering.attempt, (now.joules, now.seconds), (windows_j, windows_s), self._phases_done()
        )
        if self.spec.max_energy_joules is not None and spent.joules is None and not self._said_unknown:
            self._said_unknown = True
            warnings.warn(
                "the energy budget cannot be checked: energy is unavailable here (the wall-time budget still is)",
                RuntimeWarning,
                stacklevel=2,
            )
        caps = (self.spec.max_energy_joules, self.spec.max_wall_seconds)
        noise = max(self.spec.energy_noise, DEFAULT_PLAN_NOISE / 2)
        check = phase_check(records, spent, caps, phase, alive, delta_steps, noise=noise, **kwargs)
        if check is None:
            return None
        self.checks.append({**check, "attempt": self.metering.attempt})
        return check["reason"]

    def stop_for(
        self, step: Any, runners: Sequence[Any], kept: set[int], steps: Any, test_evals: int
    ) -> tuple[str, str] | None:
        """``(phase, why)`` when the budget cannot afford ``step`` (a study's
        :class:`~sm2jax.rounds.Step`) for the ``kept`` trials of ``runners`` (``steps(budget,
        batch_size)``: a cumulative budget in a cohort's steps; ``test_evals``: the test split's)."""
        if not self.capped:
            return None
        alive, delta = {}, {}
        for r in runners:
            n = sum(t in kept for t in r.trial_ids)
            if n:
                alive[r.spec.name] = n
                delta[r.spec.name] = steps(step.budget, r.spec.signature.batch_size) - int(r.field("step").max())
        widths = {r.spec.name: r.width for r in runners}
        reason = self.stop_reason(step.label, alive, delta, last=step.round_end, test_evals=test_evals, widths=widths)
        return None if reason is None else (step.label, reason)

    def take_checks(self) -> list[dict[str, Any]]:
        """The checks made since the last call (the study keeps them in its state: ``budget_checks``)."""
        out, self.checks = self.checks, []
        return out


def _kwh(joules: float) -> str:
    return f"{joules / 3.6e6:.3g} kWh ({joules:,.0f} J)" if joules >= 3.6e5 else format_joules(joules)
