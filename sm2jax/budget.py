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
from sm2jax.plan import DEFAULT_PLAN_NOISE, Budget, StudyPlan, measured_rates, next_phase_cost, over_budget


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


def stop_reason(
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
) -> str | None:
    """Why ``phase`` -- ``alive`` trials per cohort, each ``delta_steps`` more -- must not start:
    the upper end of its predicted cost (:func:`sm2jax.plan.next_phase_cost`, at the rates of
    ``records``) exceeds what is left of a cap (``caps``: joules, seconds); ``None`` when it fits,
    nothing is capped, or a cohort has no rate to predict from."""
    if caps == (None, None) or not alive:
        return None
    rates = measured_rates(records, widths)
    if any(c not in rates for c in alive):
        return None
    joules, seconds = next_phase_cost(
        alive,
        rates,
        delta_steps,
        last=last,
        noise=noise,
        between=(spent.between_seconds, spent.between_watts),
        test_evals=test_evals,
    )
    return over_budget(Budget(caps[0], caps[1], spent.joules, spent.seconds), joules, seconds, phase)


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
        return stop_reason(records, spent, caps, phase, alive, delta_steps, noise=noise, **kwargs)


def _kwh(joules: float) -> str:
    return f"{joules / 3.6e6:.3g} kWh ({joules:,.0f} J)" if joules >= 3.6e5 else f"{joules:,.1f} J"
