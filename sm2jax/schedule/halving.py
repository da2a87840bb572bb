"""The decisions of successive halving and SM2 over :class:`~sm2jax.schedule.candidates.Candidate`
records (the maths: :mod:`sm2jax.schedule.candidates`): exploration's filter, halving a rung,
SM2's optional drop of the clearly worse, the finalists' front, and :func:`decide_phase`, which
picks among them for a phase (the built-in schedulers' decision)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from sm2jax.schedule.candidates import (
    DEFAULT_EXPLORE_Z,
    KEEP_RULES,
    Candidate,
    Objective,
    clearly_better,
    non_dominated,
    rank,
    score_margin,
)


def halve(
    candidates: Sequence[Candidate], objective: Objective, eta: int, keep: str = "ceil"
) -> tuple[list[int], list[dict[str, Any]]]:
    """Successive-halving step: keep the best ``ceil(n / eta)`` healthy candidates (``keep="ceil"``),
    or ``floor(n / eta)`` as Hyperband's inner loop does (Li et al. 2018, Algorithm 1; ``"floor"``);
    at least one either way.

    Returns the kept trial ids and one decision record per candidate (with its terms and reason).
    """
    if keep not in KEEP_RULES:
        raise ValueError(f"keep: unknown rule {keep!r}; known: {KEEP_RULES}")
    ranked = rank(candidates, objective)
    keep_n = max(1, math.ceil(len(candidates) / eta) if keep == "ceil" else len(candidates) // eta)
    kept, records = [], []
    for position, (c, terms) in enumerate(ranked):
        healthy = terms["objective"] != -math.inf
        keep = healthy and len(kept) < keep_n
        why = f" ({terms['why']})" if terms.get("why") else ""
        if keep:
            kept.append(c.trial_id)
            code, reason = "top_k", f"rank {position + 1} of {len(ranked)}: in the top {keep_n}{why}"
        elif not healthy:
            code, reason = (
                ("diverged", f"diverged at step {c.diverged_at}")
                if c.diverged
                else ("score_not_finite", "score is not finite")
            )
        else:
            code, reason = "outside_top_k", f"rank {position + 1} of {len(ranked)}: outside the top {keep_n}{why}"
        records.append(
            {
                **c.terms(),
                **terms,
                "objective": terms["objective"] if healthy else None,
                "kept": keep,
                "reason_code": code,
                "reason": reason,
            }
        )
    return kept, records


def drop_clearly_worse(
    candidates: Sequence[Candidate], kept: list[int], records: list[dict[str, Any]], *, z: float, seed_se: float = 0.0
) -> list[int]:
    """SM2 at a rung before the last: of the ``kept`` top ``1/eta``, those whose score is clearly worse
    than the best kept score -- by more than ``z`` standard errors of the difference, counting the
    split's sampling noise and the seed noise exploration measured (``seed_se``; conservative later
    in training, where seeds matter less) -- go no further. Successive halving carries them because
    of their rank alone; SM2 saves their next rung. Updates their ``records``; returns the kept ids."""
    by_id = {c.trial_id: c for c in candidates}
    scored = [by_id[t] for t in kept if by_id[t].healthy]
    if len(scored) < 2:
        return kept
    best = max(scored, key=lambda c: (c.score, -c.trial_id))
    noise = lambda c: math.hypot(c.score_se, seed_se)
    out = []
    for t in kept:
        c = by_id[t]
        margin = z * math.hypot(noise(best), noise(c))
        if c is not best and c.healthy and best.score - c.score > margin:
            record = next(r for r in records if r["trial_id"] == t)
            record.update(
                kept=False,
                reason_code="clearly_worse",
                reason=(
                    f"in the top by rank, but clearly worse than trial {best.trial_id}: {c.score:.4g} vs {best.score:.4g} "
                    f"(difference {best.score - c.score:.3g} > {margin:.3g}, sampling and seed noise at z={z:g})"
                ),
            )
            continue
        out.append(t)
    return out


def exploration_filter(
    candidates: Sequence[Candidate], *, z: float = DEFAULT_EXPLORE_Z, keep: float = 1.0
) -> tuple[list[int], list[dict[str, Any]]]:
    """SM2's "save more" step after exploratory pretraining (module docstring).

    Drops, in this order of reasons: divergence, a non-finite score, not having learned, being
    clearly worse than the best of its own cohort ("clearly": by more than ``z`` standard errors of
    the difference), and being outside the best ``ceil(keep * k)`` of its cohort's ``k``
    configurations (``keep`` 1: no halving; a slow starter is its cohort's only survivor). The best
    configuration of every cohort that learned is always kept. Energy is equal inside a cohort, so
    no decision here depends on an energy figure.
    """
    if z < 0:
        raise ValueError(f"noise multiplier z must be >= 0 (got {z})")
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1] (got {keep})")
    healthy = [c for c in candidates if c.healthy]
    verdicts = {c.trial_id: _learned(c, z) for c in healthy}
    nothing_learned = bool(healthy) and not any(ok for ok, _ in verdicts.values())
    learners = [c for c in healthy if verdicts[c.trial_id][0] or nothing_learned]
    # Each family (cohort) keeps its best to the first rung, learned or not: a slow starter.
    slow_starters = set()
    for cohort in dict.fromkeys(c.cohort for c in healthy):
        family = [c for c in healthy if c.cohort == cohort]
        if not any(verdicts[c.trial_id][0] for c in family) and not nothing_learned:
            slow_starters.add(min(family, key=_progress_key).trial_id)
    drops = {
        c.trial_id: _drop(c, verdicts, learners, slow_starters, nothing_learned=nothing_learned, z=z)
        for c in candidates
    }
    _halve_each_cohort(candidates, drops, keep)
    kept, records = [], []
    for c in candidates:
        code, reason, by = drops[c.trial_id]
        survives = not code
        if survives:
            kept.append(c.trial_id)
            code, reason = _kept_reason(c, c.trial_id in slow_starters, nothing_learned)
        records.append(
            {
                **c.terms(),
                "kept": survives,
                "reason_code": code,
                "reason": reason,
                "dominated_by": None if by is None else by.trial_id,
                "z": z,
            }
        )
    return kept, records


def _learned(c: Candidate, z: float) -> tuple[bool, str]:
    """Whether exploration moved ``c`` clearly above its score before it (or chance), and why not."""
    refs = []
    if c.start_score is not None and math.isfinite(c.start_score):
        refs.append((c.start_score, c.start_se, "its score before exploration"))
    if c.chance_score is not None:
        refs.append((c.chance_score, 0.0, "chance"))
    if not refs:
        return True, ""
    ref, se, what = max(refs, key=lambda r: r[0])
    margin = z * math.hypot(c.score_se, se)
    return (
        c.score - ref > margin,
        f"score {c.score:.4g} is not clearly above {what} {ref:.4g} (difference {c.score - ref:.3g} <= {margin:.3g})",
    )


def _drop(
    c: Candidate,
    verdicts: dict[int, tuple[bool, str]],
    learners: list[Candidate],
    slow_starters: set[int],
    *,
    nothing_learned: bool,
    z: float,
) -> tuple[str, str, Candidate | None]:
    """Why exploration drops ``c`` before halving (``("", "", None)``: it does not), and by whom."""
    if c.diverged:
        return "diverged", f"diverged at step {c.diverged_at}", None
    if not math.isfinite(c.score):
        return "score_not_finite", "score is not finite", None
    if c.trial_id in slow_starters:
        return "", "", None
    if not verdicts[c.trial_id][0] and not nothing_learned:
        return "not_learned", f"not learned: {verdicts[c.trial_id][1]}", None
    mates = [o for o in learners if o is not c and o.cohort == c.cohort and clearly_better(o, c, z)]
    if not mates:
        return "", "", None
    by = max(mates, key=lambda o: (o.score, -o.trial_id))
    return (
        "dominated_in_cohort",
        f"clearly worse than trial {by.trial_id} of its cohort: {c.score:.4g} vs {by.score:.4g} "
        f"(difference {by.score - c.score:.3g} > {score_margin(by, c, z):.3g}; energy per step is equal in a cohort)",
        by,
    )


def _halve_each_cohort(
    candidates: Sequence[Candidate], drops: dict[int, tuple[str, str, Candidate | None]], keep: float
) -> None:
    """Successive halving inside each cohort: the best ``ceil(keep * k)`` of its ``k`` go on."""
    for cohort in dict.fromkeys(c.cohort for c in candidates):
        family = [c for c in candidates if c.cohort == cohort]
        passed = sorted((c for c in family if not drops[c.trial_id][0]), key=_rank_key)
        n = max(1, math.ceil(keep * len(family) - 1e-9))
        for position, c in enumerate(passed[n:], start=n + 1):
            drops[c.trial_id] = (
                "outside_cohort_half",
                f"rank {position} of its cohort's {len(passed)} survivors of the clear-margin test: outside the best "
                f"{n} of {len(family)} (exploration halves each cohort, explore_keep={keep:g}; score {c.score:.4g})",
                None,
            )


def _kept_reason(c: Candidate, slow_starter: bool, nothing_learned: bool) -> tuple[str, str]:
    if nothing_learned:
        return "nothing_learned", "no configuration learned clearly during exploration: none dropped for not learning"
    if slow_starter:
        loss = "" if c.val_loss is None else f", validation loss {c.val_loss:.4g}"
        return (
            "slow_starter",
            f"nothing in its cohort has learned yet: its best (score {c.score:.4g}{loss}) is kept to the first rung",
        )
    return "not_dominated", "learned and not clearly worse than the best of its cohort"


def _loss(c: Candidate) -> float:
    """The validation loss, ``inf`` where it is unknown or not finite (it sorts last)."""
    return c.val_loss if c.val_loss is not None and math.isfinite(c.val_loss) else math.inf


def _rank_key(c: Candidate) -> tuple:
    """Best first inside a cohort: the score, then the lowest validation loss, then the trial id."""
    return (-c.score, _loss(c), c.trial_id)


def _progress_key(c: Candidate) -> tuple:
    """Best first: the lowest validation loss (it moves before a 0/1 metric), else the score."""
    return (_loss(c), -c.score, c.trial_id)


def finalist_front(candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
    """The final rung's healthy candidates with their score, energy to train and Pareto membership
    on (score up, energy to train down), best score first: the trade-off shown beside the selection,
    which is made on the score alone (ties within the noise broken by energy)."""
    healthy = sorted((c for c in candidates if c.healthy), key=lambda c: (-c.score, c.trial_id))
    known = all(c.decision_energy is not None for c in healthy)
    front = (
        {healthy[i].trial_id for i in non_dominated([(c.score, c.decision_energy) for c in healthy])}
        if known
        else set()
    )
    return [
        {
            "trial_id": c.trial_id,
            "cohort": c.cohort,
            "score": c.score,
            "score_se": c.score_se,
            "projected_train_joules": c.decision_energy,  # rate x the full budget: a projection
            "energy_noise": c.energy_noise,
            "pareto": None if not known else c.trial_id in front,
        }
        for c in healthy
    ]


@dataclasses.dataclass
class PhaseDecision:
    kept: list[int]  # surviving trial ids, best first
    records: list[dict[str, Any]]  # one decision record per candidate
    selected: int | None = None  # at the final rung: the selection
    finalists: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def decide_phase(
    phase: str, candidates: Sequence[Candidate], rules: Any, *, last: bool, seed_se: float = 0.0
) -> PhaseDecision:
    """The survivors of a phase (``rules``: the study's :class:`~sm2jax.phases.DecisionRules`):
    exploration's filter, a halving step (SM2: without the clearly
    worse of its top, ``seed_se`` being exploration's seed noise), or at the final rung the selection
    (one configuration, by ``final_objective``) and the finalists' Pareto front."""
    if phase == "explore":
        kept, records = exploration_filter(candidates, z=rules.explore_z, keep=rules.explore_keep)
    elif last:
        kept, records = halve(candidates, rules.final_objective, eta=len(candidates) + 1)  # keep only the best
    else:
        kept, records = halve(candidates, rules.objective, rules.eta, rules.keep_rule)
        if rules.rung_z is not None:
            kept = drop_clearly_worse(candidates, kept, records, z=rules.rung_z, seed_se=seed_se)
    if not last:
        return PhaseDecision(kept, records)
    return PhaseDecision(kept, records, kept[0] if kept else None, finalist_front(candidates))
