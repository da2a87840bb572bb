"""When to stop: a scheduler names a study's phases (each a cumulative budget) and makes the
decision that ends each -- which configurations go on, and at the last phase the selection.

A scheduler is a :class:`Scheduler` registered under a name (a study's ``mode``). Built in:
``sm2`` (exploratory pretraining, then energy-aware successive halving), ``sh`` (successive
halving) and ``full`` (every configuration to the full budget): one :class:`HalvingScheduler`
whose phases and decisions the spec's fields set (:func:`sm2jax.phases.decide_phase`). Adding one
is a new file::

    from sm2jax.schedule import PhaseDecision, Scheduler, register_scheduler

    class KeepTwo(Scheduler):
        name = "keep-two"

        def phases(self, spec):
            return [("warm-up", spec.min_budget), ("final", spec.max_budget)]

        def decide(self, phase, candidates, rules, *, last, seed_se=0.0):
            best = sorted(candidates, key=lambda c: -c.score)
            ...  # PhaseDecision(kept, records, selected, finalists)

    register_scheduler(KeepTwo())

and ``StudySpec(mode="keep-two", ...)`` runs it (its module is recorded in the study's ``imports``).
Every phase's energy windows, checkpoints, resume and report work as for the built-in ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sm2jax.budgets import rung_budgets
from sm2jax.registry import Registry
from sm2jax.schedule.candidates import Candidate
from sm2jax.schedule.halving import PhaseDecision, decide_phase

__all__ = ["HalvingScheduler", "PhaseDecision", "Scheduler", "get_scheduler", "register_scheduler"]


class Scheduler:
    """A study's phases and the decision that ends each (see the module docstring)."""

    name: str = ""

    def phases(self, spec: Any) -> list[tuple[str, float]]:
        """``(name, cumulative budget)`` of every phase, in order (names unique; budgets increase)."""
        raise NotImplementedError

    def effective(self, spec: Any) -> Any:
        """``spec`` as this scheduler runs it (default: as written). A scheduler that ignores some
        of the spec's fields says so here (plain successive halving explores nothing), never by
        rewriting what the user wrote: ``spec.json`` keeps the user's values."""
        return spec

    def decide(
        self, phase: str, candidates: Sequence[Candidate], rules: Any, *, last: bool, seed_se: float = 0.0
    ) -> PhaseDecision:
        """The end of ``phase``: the candidates kept, one record per candidate (``trial_id``,
        ``kept``, ``reason_code``, ``reason``), and at the ``last`` phase the selection (a kept
        trial id) and the finalists (:func:`sm2jax.schedule.halving.finalist_front`). ``rules``: the
        study's :class:`~sm2jax.phases.DecisionRules`; ``seed_se``: exploration's seed noise."""
        raise NotImplementedError


class HalvingScheduler(Scheduler):
    """Exploration (``explore_budget`` > 0) and successive-halving rungs (``rungs``, else
    ``min_budget * eta**i`` up to ``max_budget``), decided by
    :func:`sm2jax.schedule.halving.decide_phase`. ``sh`` runs a spec without exploration, seed
    replicates or an energy-aware objective (``performance``); ``full`` also trains every
    configuration to the full budget (one rung at ``max_budget``)."""

    def __init__(self, name: str):
        self.name = name

    def effective(self, spec: Any) -> Any:
        if self.name == "sh":
            return _replace(spec, explore_budget=0.0, objective="performance", replicates=0)
        if self.name == "full":
            return _replace(spec, explore_budget=0.0, objective="performance", replicates=0, min_budget=spec.max_budget)
        return spec

    def phases(self, spec: Any) -> list[tuple[str, float]]:
        spec = self.effective(spec)
        out = [("explore", spec.explore_budget)] if spec.explore_budget > 0 else []
        rungs = spec.rungs if spec.rungs is not None else rung_budgets(spec.min_budget, spec.max_budget, spec.eta)
        return out + [(f"rung-{i + 1}", float(r)) for i, r in enumerate(rungs)]

    def decide(self, phase, candidates, rules, *, last, seed_se=0.0):
        return decide_phase("final" if last else phase, candidates, rules, last=last, seed_se=seed_se)


_SCHEDULERS: Registry[Scheduler] = Registry(
    "mode", "register_scheduler(...)", extra=("hyperband (sm2jax run --mode hyperband)",)
)


def register_scheduler(scheduler: Scheduler) -> Scheduler:
    """Makes ``scheduler`` a study's ``mode`` under ``scheduler.name``; returns it."""
    return _SCHEDULERS.register(scheduler)


def get_scheduler(name: str) -> Scheduler:
    """The scheduler registered as ``name``; one line naming the known ones otherwise."""
    return _SCHEDULERS.get(name)


for _mode in ("sm2", "sh", "full"):
    register_scheduler(HalvingScheduler(_mode))


def _replace(spec: Any, **fields: Any) -> Any:
    import dataclasses

    same = all(getattr(spec, k) == v for k, v in fields.items())
    return spec if same else dataclasses.replace(spec, **fields)
