"""When to stop: a scheduler names a study's phases (each a cumulative budget) and makes the
decision that ends each -- which configurations go on, and at the last phase the selection.

A scheduler is a :class:`Scheduler` registered under a name (a study's ``mode``). Built in:
``sm2`` (exploratory pretraining, then energy-aware successive halving), ``sh`` (successive
halving) and ``full`` (every configuration to the full budget): one :class:`HalvingScheduler`
whose phases and decisions the spec's fields set (:func:`sm2jax.phases.decide_phase`); and
``hyperband`` (:class:`HyperbandScheduler`), whose brackets are the study's rounds, each with its
own size and rungs (:meth:`Scheduler.rounds`). Adding one is a new file::

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

import dataclasses
from collections.abc import Sequence
from typing import Any

from sm2jax.budgets import hyperband_brackets, rung_budgets
from sm2jax.registry import Registry
from sm2jax.schedule.candidates import Candidate
from sm2jax.schedule.halving import PhaseDecision, decide_phase

__all__ = [
    "HalvingScheduler",
    "HyperbandScheduler",
    "PhaseDecision",
    "RoundPlan",
    "Scheduler",
    "get_scheduler",
    "register_scheduler",
]


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """One round of a study as its scheduler runs it: how many configurations the searcher
    proposes (``size``), the round's ``phases`` (``(name, cumulative budget)``, the last at the
    full budget), what the report says of it (``about``, e.g. Hyperband's bracket), and whether
    the searcher must propose exactly ``size`` (``exact``; else a cohort-aware searcher may round
    it up to whole cohorts of the vmap width, which a GPU trains at nearly the cost of one)."""

    size: int
    phases: tuple[tuple[str, float], ...]
    about: tuple[tuple[str, Any], ...] = ()
    exact: bool = False


class Scheduler:
    """A study's phases and the decision that ends each (see the module docstring)."""

    name: str = ""

    def phases(self, spec: Any) -> list[tuple[str, float]]:
        """``(name, cumulative budget)`` of every phase, in order (names unique; budgets increase)."""
        raise NotImplementedError

    def rounds(self, spec: Any, sizes: Sequence[int]) -> list[RoundPlan]:
        """The study's rounds (default: one per requested size -- ``num_samples`` over ``rounds``,
        then each extension's -- each running :meth:`phases`). A scheduler whose rounds differ
        (Hyperband's brackets) returns its own; the last phase of every round is at the full budget,
        so the rounds' selections compete on the same terms (:func:`sm2jax.rounds.select_across_rounds`)."""
        phases = tuple(self.phases(spec))
        return [RoundPlan(int(n), phases) for n in sizes]

    def check(self, spec: Any) -> None:
        """One line for a spec this scheduler cannot run (default: none); called by the spec."""

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


class HyperbandScheduler(HalvingScheduler):
    """Hyperband (Li et al., "Hyperband: a novel bandit-based approach to hyperparameter
    optimization", JMLR 18(185), 2018, Algorithm 1) as one study: its brackets
    ``s = s_max .. 0`` are the study's rounds, most exploratory first. Bracket ``s`` proposes
    ``n = ceil((s_max + 1) / (s + 1) * eta**s)`` configurations and halves them over rungs
    ``r_i = R * eta**(i - s)`` keeping ``floor(n_i / eta)`` (:func:`sm2jax.budgets.hyperband_brackets`;
    integral budgets when the unit is steps or samples); ``R`` is ``max_budget``. The selection is
    the best score over the brackets' selections, all trained to ``R``. ``num_samples`` is not
    used: ``max_budget`` and ``eta`` set every bracket's ``n`` (the report's rounds list them).

    Proposals come from the study's searcher, round by round: ``random`` (or a grid's space drawn at
    random) is Li et al.'s Hyperband; ``sampler="tpe"`` fits its model to every bracket before
    the next, as BOHB does (Falkner et al., ICML 2018). Every searcher proposes exactly a bracket's
    ``n`` (no rounding up to whole cohorts: the rungs' counts are the algorithm's). Like ``sh``, it
    explores nothing and ranks on the score."""

    def __init__(self):
        super().__init__("hyperband")

    def check(self, spec: Any) -> None:
        if spec.rounds != 1 or spec.extensions:
            raise ValueError(
                "Hyperband's rounds are its brackets (max_budget and eta set them): leave rounds at 1 and do not extend it; to search on from it, run a study with --set warm_start=DIR and sampler=tpe"
            )
        if spec.max_energy_joules is not None or spec.max_wall_seconds is not None:
            raise ValueError(
                "a budget (--budget-kwh, --budget-hours) caps a study of one round, and Hyperband runs one per bracket: cap a study of --mode sm2 or sh instead"
            )

    def effective(self, spec: Any) -> Any:
        sampler = "random" if spec.sampler == "grid" else spec.sampler  # Hyperband samples
        return _replace(
            spec, sampler=sampler, explore_budget=0.0, objective="performance", replicates=0, keep_rule="floor"
        )

    def brackets(self, spec: Any) -> list[dict[str, Any]]:
        integral = spec.budget_unit in ("steps", "samples") and spec.max_budget == int(spec.max_budget)
        return hyperband_brackets(spec.max_budget, spec.eta, integral=integral)

    def rounds(self, spec: Any, sizes: Sequence[int]) -> list[RoundPlan]:
        return [
            RoundPlan(
                int(b["n"]),
                tuple((f"rung-{i + 1}", float(r["r"])) for i, r in enumerate(b["rungs"])),
                (("bracket", int(b["s"])), ("r", float(b["r"]))),
                exact=True,
            )
            for b in self.brackets(spec)
        ]

    def phases(self, spec: Any) -> list[tuple[str, float]]:
        """The first (most exploratory) bracket's rungs; every bracket's: :meth:`rounds`."""
        return list(self.rounds(spec, ())[0].phases)


_SCHEDULERS: Registry[Scheduler] = Registry("mode", "sm2jax.schedule.register_scheduler")


def register_scheduler(scheduler: Scheduler) -> Scheduler:
    """Makes ``scheduler`` a study's ``mode`` under ``scheduler.name``; returns it."""
    return _SCHEDULERS.register(scheduler)


def get_scheduler(name: str) -> Scheduler:
    """The scheduler registered as ``name``; one line naming the known ones otherwise."""
    return _SCHEDULERS.get(name)


for _mode in ("sm2", "sh", "full"):
    register_scheduler(HalvingScheduler(_mode))
register_scheduler(HyperbandScheduler())
_SCHEDULERS.seal()  # the built-in ones are never replaced


def _replace(spec: Any, **fields: Any) -> Any:
    same = all(getattr(spec, k) == v for k, v in fields.items())
    return spec if same else dataclasses.replace(spec, **fields)
