"""A study's phases as pure logic: its state, candidates in, decision and survivors out.

:class:`StudyState` is what a study knows after a phase (``progress/phase-P.json``).
:func:`cohort_candidates` turns a cohort's evaluation into
:class:`~sm2jax.schedule.candidates.Candidate` records; :func:`record_phase` charges them their
energy, has the study's scheduler decide (:meth:`DecisionRules.decide`) and writes the decision
into the state. :func:`smooth_cohort_rates` and
:func:`planned_trial_steps` are the numbers decisions and the width policy read. Nothing here trains
or measures, so it is tested on constructed candidates like :mod:`sm2jax.schedule.candidates`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sm2jax.energy.ledger import add_known
from sm2jax.objectives import resolve_objective
from sm2jax.schedule.candidates import Candidate, Objective, seed_noise
from sm2jax.schedule.halving import PhaseDecision, decide_phase


def finite_or_none(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


@dataclasses.dataclass
class StudyState:
    """What a study knows after a phase; ``progress/phase-P.json`` holds it, resume reads it back.

    Attributes:
      phase: the last finished phase (-1 before the first).
      infeasible: trial id -> why it cannot run here (batch larger than the data, does not fit).
      hardware: cohort name -> ``{"width", "notes", "choices"}``, every width decision with its reason.
      runners: cohort name -> what its runner needs to continue (:meth:`CohortRunner.to_json`).
      alive: cohort name -> trial ids of its surviving rows, in row order (after the last phase:
        every finalist's, whose trained rows its checkpoint keeps for :mod:`sm2jax.handback`).
      trials: trial id -> ``{"score", "score_se", "metric", "energy_spent", "samples_spent", "history"}``
        (``energy_spent``: the joules :class:`~sm2jax.energy.metering.Metering` attributed to it in
        finished phases, the decisions' input).
      cohort_energy: cohort name -> one ``{"phase", "joules", "samples"}`` per phase (its trials'
        training energy and samples), from which decisions take a smoothed rate.
      decisions: every decision record, in order.
      selected: the selected trial id once the last phase is done.
      finalists: the last rung's candidates with their score, energy to train and whether they are
        on the score/energy Pareto front (shown apart from the selection).
      completed_by: phase name -> the attempt that completed it (an earlier attempt's windows of
        that phase are interrupted work, reported on their own line).
      test: the selected configuration's held-out test ``{"metric", "score", "score_se"}`` (``None``
        without a test split).
      metric_name: what the task calls its metric (for a report of an unfinished study).
      curves: trial id -> ``{"train": [[samples, loss], ...], "val": [[samples, score, phase], ...]}``:
        the mean training loss per energy window and the validation score per phase.
      yardsticks: for a forecast data set, the persistence and ridge-regression errors the
        selection is shown beside (:mod:`sm2jax.yardsticks`); ``None`` otherwise.
      seed_noise: ``{"phase", "pairs", "seed_se", "measured"}`` of exploration: the seed noise its
        decisions added to every score's error, from that many replicate pairs (``measured``
        false: fewer than 2 pairs, none added).
      stopped: set when a budget (``max_energy_joules``, ``max_wall_seconds``) ended the study
        after ``phase``: ``{"phase", "before", "reason", "kept", "records", "index"}`` -- the phase
        it ended after, the one it did not start and why, and that phase's own decision (its kept
        trials and records, taken back when a raised budget continues the study; ``index``: where
        the selection's records start in ``decisions``). ``None`` otherwise.
      stops: every stop a raised budget continued from (``phase``, ``before``, ``reason``,
        ``continued_by``: the attempt).
      budget_checks: every check of a capped study before a phase (:func:`sm2jax.budget.phase_check`):
        what was spent, the phase's predicted cost, the caps, and why it did not start, if it did not.
      rounds: one record per finished round (:mod:`sm2jax.rounds`): ``round``, ``phase`` (the
        index of its last phase, whose checkpoint keeps its finalists), ``label``, ``alive`` (cohort
        name -> its finalists), ``selected``, ``finalists`` and ``test`` of that round alone.
    """

    phase: int = -1
    infeasible: dict[str, str] = dataclasses.field(default_factory=dict)
    hardware: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    runners: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    alive: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    trials: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    cohort_energy: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    decisions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    selected: int | None = None
    test: dict[str, Any] | None = None
    finalists: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    completed_by: dict[str, int] = dataclasses.field(default_factory=dict)
    curves: dict[str, dict[str, list]] = dataclasses.field(default_factory=dict)
    metric_name: str = "metric"
    yardsticks: dict[str, Any] | None = None
    seed_noise: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stopped: dict[str, Any] | None = None
    stops: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    budget_checks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    rounds: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, blob: dict[str, Any]) -> StudyState:
        return cls(**blob)

    def start(self, trial_ids: Sequence[int]) -> None:
        """Records the trials that start training (infeasible ones are decided on the spot, once)."""
        decided = {d["trial_id"] for d in self.decisions if d["phase"] == "hardware"}
        for i, reason in self.infeasible.items():
            if int(i) in decided:
                continue
            self.decisions.append(
                {
                    "phase": "hardware",
                    "trial_id": int(i),
                    "kept": False,
                    "reason_code": "infeasible",
                    "reason": f"infeasible: {reason}",
                }
            )
        for t in trial_ids:
            self.trials[str(t)] = {"score": None, "energy_spent": 0.0, "samples_spent": 0, "history": []}

    def best_score_text(self) -> str:
        """The best validation score any configuration reached so far (it never goes down)."""
        scores = [v[1] for c in self.curves.values() for v in c.get("val", []) if v[1] is not None]
        return f"{max(scores):.4g}" if scores else "-"

    def curve(self, trial_id: int) -> dict[str, list]:
        return self.curves.setdefault(str(trial_id), {"train": [], "val": []})

    def record_training(self, losses: Sequence[tuple[int, int, float]], batch_size: int) -> None:
        """Adds ``(trial, step, mean loss)`` points of a cohort's training windows to the curves."""
        for t, step, loss in losses:
            self.curve(t)["train"].append([step * batch_size, finite_or_none(loss)])


@dataclasses.dataclass(frozen=True)
class DecisionRules:
    """How a phase's candidates are decided (from the spec).

    Attributes:
      objective: ranks candidates at a rung.
      final_objective: ranks them at the final rung (energy spent is sunk: a narrower tie width).
      eta: successive halving keeps ``1/eta`` per rung.
      keep_rule: ``ceil`` or ``floor`` (:func:`sm2jax.schedule.halving.halve`).
      explore_z: exploration's clear margin in standard errors.
      explore_keep: the fraction of each cohort exploration keeps at most (halving inside a cohort).
      energy_noise: relative uncertainty of a cohort's energy rate.
      plateau_tolerance: a score gain at or below this flags a candidate as plateaued.
      replicate_of: seed replicate trial id -> the configuration it replicates (SM2's seed noise).
      rung_z: SM2's clear margin to drop a configuration of a rung's top ``1/eta`` before the last
        (:func:`sm2jax.schedule.halving.drop_clearly_worse`); ``None``: rank alone, as successive halving.
    """

    objective: Objective
    final_objective: Objective
    eta: int
    keep_rule: str
    explore_z: float
    energy_noise: float
    plateau_tolerance: float
    replicate_of: dict[int, int] = dataclasses.field(default_factory=dict, hash=False)
    rung_z: float | None = None
    explore_keep: float = 1.0
    scheduler: Any = None  # decides each phase (sm2jax.schedule); None: decide_phase

    @classmethod
    def of(
        cls,
        spec: Any,
        objective: str | Objective | None = None,
        replicate_of: dict[int, int] | None = None,
        scheduler: Any = None,
    ) -> DecisionRules:
        """The rules of a :class:`~sm2jax.spec.StudySpec` (``objective``: a callable overriding its
        objective; ``replicate_of``: the study's kept replicates, default what the spec proposes;
        ``scheduler``: what decides each phase, :func:`sm2jax.schedule.get_scheduler` of its mode). The final rung ties scores only within ``final_z``: energy spent is sunk."""
        spec = spec.effective()  # as its scheduler runs it (plain SH ranks on the score)
        shared = {"energy_z": spec.energy_z, "alpha": spec.alpha, "beta": spec.beta, "target_score": spec.target_score}
        return cls(
            objective=resolve_objective(objective or spec.objective, z=spec.noise_z, **shared),
            final_objective=resolve_objective(objective or spec.objective, z=spec.final_z, **shared),
            eta=spec.eta,
            keep_rule=spec.keep_rule,
            explore_z=spec.explore_z,
            explore_keep=spec.explore_keep,
            energy_noise=spec.energy_noise,
            plateau_tolerance=spec.plateau_tolerance,
            replicate_of=spec.replicate_of() if replicate_of is None else replicate_of,
            rung_z=spec.rung_z if objective is None and spec.objective == "sm2" else None,
            scheduler=scheduler,
        )

    def decide(self, phase: str, candidates: Sequence[Candidate], *, last: bool, seed_se: float = 0.0) -> PhaseDecision:
        """The end of ``phase`` as the study's scheduler decides it."""
        if self.scheduler is None:
            return decide_phase("final" if last else phase, candidates, self, last=last, seed_se=seed_se)
        return self.scheduler.decide(phase, candidates, self, last=last, seed_se=seed_se)


def cohort_candidates(
    state: StudyState,
    cohort: str,
    trial_ids: Sequence[int],
    end: Any,
    base: Any,
    rows: dict[str, np.ndarray],
    batch_size: int,
    total_samples: int,
    samples_before: dict[int, int],
    chance: float | None,
    rules: DecisionRules,
) -> list[Candidate]:
    """One cohort's candidates at the end of a phase, from its evaluation ``end`` (per-row
    ``scores``, ``metrics``, ``score_se``), the untrained models' evaluation ``base`` (``None``:
    judged against ``chance`` and the last score), and its ``rows``' ``step``, ``active`` and
    ``diverged_at``; each trial's record in ``state`` takes the new score, metric and samples."""
    step, active, diverged_at = rows["step"], rows["active"], rows["diverged_at"]
    out = []
    for row, t in enumerate(trial_ids):
        record = state.trials[str(t)]
        previous = record["score"] if base is None else float(base.scores[row])
        samples = int(step[row]) * batch_size
        score = float(end.scores[row])
        out.append(
            Candidate(
                trial_id=t,
                cohort=cohort,
                score=score,
                gain=score - previous if previous is not None and math.isfinite(score) else None,
                energy_spent=None,
                energy_last=None,
                samples_spent=samples,
                samples_last=samples - samples_before[t],
                samples_total=total_samples,
                diverged=not bool(active[row]),
                diverged_at=int(diverged_at[row]),
                plateau_tolerance=rules.plateau_tolerance,
                score_se=float(end.score_se[row]),
                start_score=None if base is None else float(base.scores[row]),
                start_se=0.0 if base is None else float(base.score_se[row]),
                chance_score=chance,
                energy_noise=rules.energy_noise,
                val_loss=None if end.losses is None else finite_or_none(float(end.losses[row])),
            )
        )
        record.update(
            score=finite_or_none(score),
            score_se=float(end.score_se[row]),
            metric=finite_or_none(float(end.metrics[row])),
            samples_spent=samples,
        )
    return out


def smooth_cohort_rates(
    cohort_energy: dict[str, list[dict[str, Any]]], candidates: Sequence[Candidate], energy_noise: float
) -> None:
    """Gives each candidate its cohort's training joules per sample smoothed over every phase so
    far (total training joules / total samples; evaluation is a fixed cost per phase, not per
    sample) with the relative noise ``energy_noise``. A cohort with an unavailable phase gets no
    rate. (The spread of per-phase rates is not used as noise: it mixes real changes -- a narrower
    width for survivors, warm-up -- with noise, and is itself too noisy to decide on.)"""
    for c in candidates:
        rate = cohort_rate(cohort_energy.get(c.cohort, []))
        if rate is not None:
            c.cohort_rate, c.energy_noise = rate, energy_noise


def cohort_rate(history: Sequence[dict[str, Any]]) -> float | None:
    """A cohort's training joules per sample over its phases (``history``: its
    :attr:`StudyState.cohort_energy`): total joules / total samples; ``None`` with no samples or
    an unavailable phase."""
    used = [h for h in history if h["samples"] > 0]
    if not used or any(h["joules"] is None for h in used):
        return None
    return sum(h["joules"] for h in used) / sum(h["samples"] for h in used)


def record_phase(
    state: StudyState,
    phase: str,
    candidates: Sequence[Candidate],
    phase_joules: dict[int, float | None],
    train_joules: dict[int, float | None],
    rules: DecisionRules,
    *,
    last: bool,
    energy_method: str,
    stop: Callable[[PhaseDecision], tuple[str, str] | None] | None = None,
    kind: str | None = None,
) -> PhaseDecision:
    """Charges each candidate this phase's joules (``phase_joules``: training and evaluation;
    ``train_joules``: training only, for its cohort's rate), decides, and records it all in
    ``state``.

    ``stop``: asked, before a phase that is not the last, with its decision; ``(next_phase,
    reason)`` makes this phase the last (a budget cannot afford the next one): its candidates are
    decided as the final rung's are, and the phase's own decision is kept in ``state.stopped``.
    ``kind``: the scheduler's name of the phase where ``phase`` labels it otherwise (a later
    round's ``r2.explore`` is an ``explore``)."""
    kind = kind or phase
    training: dict[str, dict[str, Any]] = {}
    for c in candidates:
        record = state.trials[str(c.trial_id)]
        c.energy_last = phase_joules[c.trial_id]
        c.energy_spent = add_known(record["energy_spent"], c.energy_last)
        record.update(energy_spent=c.energy_spent, cohort=c.cohort, samples_total=c.samples_total)
        record["history"].append(
            {
                "phase": phase,
                "score": record["score"],
                "score_se": c.score_se,
                "samples": c.samples_spent,
                "energy_spent": c.energy_spent,
            }
        )
        window = training.setdefault(c.cohort, {"phase": phase, "joules": 0.0, "samples": 0})
        window["joules"] = add_known(window["joules"], train_joules[c.trial_id])
        window["samples"] += c.samples_last
    for cohort, window in training.items():
        state.cohort_energy.setdefault(cohort, []).append(window)
    smooth_cohort_rates(state.cohort_energy, candidates, rules.energy_noise)
    for c in candidates:
        state.curve(c.trial_id)["val"].append([c.samples_spent, finite_or_none(c.score), phase])
    originals = [c for c in candidates if c.trial_id not in rules.replicate_of]
    replicas = [c for c in candidates if c.trial_id in rules.replicate_of]
    if replicas and kind == "explore":
        seed_se = measure_seed_noise(state, originals, replicas, rules.replicate_of)
        for c in originals:
            c.seed_se = seed_se
    explored = state.seed_noise[0]["seed_se"] if state.seed_noise else 0.0  # 0 where too few pairs
    decision = rules.decide(kind, originals, last=last, seed_se=explored)
    stopping = None if last or stop is None else stop(decision)
    if stopping is not None:
        before, reason = stopping
        own = decision
        decision = rules.decide(kind, originals, last=True)  # its best configuration so far
        last = True
        state.stopped = {
            "phase": phase,
            "before": before,
            "reason": reason,
            "kept": own.kept,
            "records": [{"phase": phase, **r, "energy_method": energy_method} for r in own.records],
            "index": len(state.decisions),
        }
    stop_replicates(decision, replicas, rules.replicate_of)
    state.decisions.extend({"phase": phase, **rec, "energy_method": energy_method} for rec in decision.records)
    if last:
        state.selected, state.finalists = decision.selected, decision.finalists
    return decision


def continue_after_stop(state: StudyState, attempt: int) -> list[int]:
    """Takes back a budget's stop (:attr:`StudyState.stopped`): the stopped phase's own decision
    replaces the selection made in its place, the stop is kept in ``stops``; returns the trial
    ids that phase kept (the next phase trains them)."""
    stopped, state.stopped = state.stopped, None
    state.decisions = state.decisions[: stopped["index"]] + stopped["records"]
    state.selected, state.finalists = None, []
    state.stops.append({k: stopped[k] for k in ("phase", "before", "reason")} | {"continued_by": attempt})
    return list(stopped["kept"])


def measure_seed_noise(
    state: StudyState, originals: Sequence[Candidate], replicas: Sequence[Candidate], replicate_of: dict[int, int]
) -> float:
    """Exploration's seed noise from its replicate pairs (:func:`sm2jax.schedule.candidates.seed_noise`),
    recorded in ``state``; 0 with fewer than 2 healthy pairs (too few to measure)."""
    by_id = {c.trial_id: c for c in originals}
    pairs = []
    for r in replicas:
        original = by_id.get(replicate_of[r.trial_id])
        if original is not None and original.healthy and r.healthy:
            pairs.append((original.score, r.score, original.score_se, r.score_se))
    measured = seed_noise(pairs)
    value = 0.0 if measured is None else measured
    state.seed_noise.append(
        {"phase": "explore", "pairs": len(pairs), "seed_se": value, "measured": measured is not None}
    )
    return value


def stop_replicates(decision: PhaseDecision, replicas: Sequence[Candidate], replicate_of: dict[int, int]) -> None:
    """Seed replicates stop once exploration has measured the seed noise: it protects exploration's
    drops, where a configuration is judged early and a false drop loses it for good. The rungs rank
    on the split's sampling noise, as successive halving does: wider ties there would let energy
    decide between configurations that differ by more than the split's noise. Adds each replicate's
    decision record to ``decision``."""
    for r in replicas:
        original = replicate_of[r.trial_id]
        decision.records.append(
            {
                **r.terms(),
                "kept": False,
                "reason_code": "replicate",
                "reason": f"seed replicate of trial {original} (measured the seed noise; never selected): stops",
                "replicate_of": original,
            }
        )


def planned_trial_steps(
    phases: Sequence[tuple[str, float]], steps: Callable[[float], int], k: int, done: int, from_phase: int, eta: int
) -> float:
    """Trial-steps of ``k`` trials, each ``done`` steps in, from ``from_phase`` on, if successive
    halving keeps ``1/eta`` of them per rung (an estimate for the width policy, not a promise).
    ``steps(budget)`` converts a phase's cumulative budget to the cohort's steps."""
    alive, total = float(k), 0.0
    for name, budget in phases[from_phase:]:
        target = steps(budget)
        total += alive * max(target - done, 0)
        done = max(done, target)
        if name != "explore":
            alive = max(1.0, alive / eta)
    return total
