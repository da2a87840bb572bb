"""SM2 decisions: rung budgets, the exploration filter, objectives, and Hyperband brackets.

Everything here is pure logic over :class:`Candidate` records, so it is tested without training.

SM2 (Geissler et al., "Spend More to Save More", arXiv 2412.08526) is successive halving (SH) made
energy-aware: every configuration first gets a short *exploratory* budget with its energy measured;
diverged and dominated configurations are dropped before the first rung; the rest go through SH
rungs ranked by an objective that blends performance and energy.

Our objective (the paper's exact formula is not available to us) is

.. math::

    f = \\alpha \\hat P + \\beta (1 - \\hat E) + (1 - \\alpha - \\beta) \\hat G,

where :math:`P` is the validation score (higher is better), :math:`E` the energy projected to the
full budget (joules so far + joules per sample over the last budget x samples still to train), and
:math:`G` the progress per joule over the last budget (score gain / energy spent on it: it rewards
learning rates that learn fast for their energy and punishes ones that stall or oscillate). Hats
denote min-max normalisation over the rung's candidates; a term that is constant up to float noise
(relative spread below 1e-6, e.g. equal energy shares within one cohort) normalises to 0.5 for
everyone, so noise is never amplified into a ranking. Defaults: alpha = 0.5, beta = 0.3.

References:
  Jamieson & Talwalkar, "Non-stochastic best arm identification and hyperparameter optimization",
  AISTATS 2016 (successive halving). Li et al., "Hyperband", JMLR 18(185), 2018. Deb et al.,
  "A fast and elitist multiobjective genetic algorithm: NSGA-II", IEEE TEC 6(2), 2002 (non-dominated
  sorting, crowding distance).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

NORMALISE_RTOL = 1e-6


@dataclasses.dataclass
class Candidate:
    """What a decision knows about one configuration at the end of a phase.

    Attributes:
      trial_id: the configuration's id.
      cohort: its cohort's name.
      score: validation score, higher is better (NaN if it cannot be evaluated).
      gain: score improvement over the last budget (``None`` with no earlier score, e.g. at the
        first rung of plain successive halving: undefined, never a stand-in 0).
      energy_spent: joules attributed so far (training and evaluation, without compilation);
        ``None`` when energy is unavailable.
      energy_last: joules attributed over the last budget (``None`` when unavailable).
      samples_spent: training samples consumed so far.
      samples_total: training samples at the full budget.
      diverged: the trial produced a non-finite loss or gradient and is frozen.
      diverged_at: step of divergence (-1 if finite).
      plateau_tolerance: gain at or below which the candidate counts as plateaued.
    """

    trial_id: int
    cohort: str
    score: float
    gain: float | None
    energy_spent: float | None
    energy_last: float | None
    samples_spent: int
    samples_last: int
    samples_total: int
    diverged: bool = False
    diverged_at: int = -1
    plateau_tolerance: float = 0.005

    @property
    def plateaued(self) -> bool | None:
        """Learning-rate behaviour: no meaningful score gain over the last budget (``None``: no gain)."""
        if self.gain is None:
            return None
        return not self.diverged and self.gain <= self.plateau_tolerance

    @property
    def projected_energy(self) -> float | None:
        """Joules to reach the full budget at the energy rate of the last budget."""
        if self.energy_spent is None or self.energy_last is None or self.samples_last <= 0:
            return self.energy_spent
        remaining = max(self.samples_total - self.samples_spent, 0)
        return self.energy_spent + self.energy_last / self.samples_last * remaining

    @property
    def joules_per_sample(self) -> float | None:
        if self.energy_last is None or self.samples_last <= 0:
            return None
        return self.energy_last / self.samples_last

    @property
    def progress_per_joule(self) -> float | None:
        if self.gain is None or self.energy_last is None or self.energy_last <= 0:
            return None
        return self.gain / self.energy_last

    def terms(self) -> dict[str, Any]:
        return {
            "trial_id": self.trial_id, "cohort": self.cohort, "score": self.score, "gain": self.gain,
            "energy_spent_j": self.energy_spent, "energy_last_j": self.energy_last,
            "projected_energy_j": self.projected_energy, "joules_per_sample": self.joules_per_sample,
            "progress_per_joule": self.progress_per_joule, "samples_spent": self.samples_spent,
            "diverged": self.diverged, "diverged_at": self.diverged_at, "plateaued": self.plateaued,
        }


def normalise(values: Sequence[float | None]) -> list[float]:
    """Min-max normalisation to [0, 1]; constant (within ``NORMALISE_RTOL``) or missing -> 0.5."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    if not present:
        return [0.5] * len(values)
    lo, hi = min(present), max(present)
    if hi - lo <= NORMALISE_RTOL * max(abs(lo), abs(hi), 1e-30):
        return [0.5] * len(values)
    return [0.0 if v is None or not math.isfinite(v) else (v - lo) / (hi - lo) for v in values]


# ------------------------------------------------------------------------------------ objectives


Objective = Callable[[Sequence[Candidate]], list[dict[str, Any]]]


def performance_objective(candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
    """Plain successive halving: the validation score alone."""
    return [{"objective": c.score, "P": c.score} for c in candidates]


def sm2_objective(alpha: float = 0.5, beta: float = 0.3) -> Objective:
    """The SM2 blend ``alpha * P^ + beta * (1 - E^) + (1 - alpha - beta) * G^`` (module docstring).

    Where energy is unavailable for any candidate, the energy terms cannot be compared honestly and
    the objective falls back to ``P^`` alone; each record says so.
    """
    if not (0 <= alpha <= 1 and 0 <= beta <= 1 and alpha + beta <= 1):
        raise ValueError(f"need 0 <= alpha, beta and alpha + beta <= 1 (got alpha={alpha}, beta={beta})")

    def objective(candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
        p_hat = normalise([c.score for c in candidates])
        if any(c.energy_spent is None for c in candidates):
            return [{"objective": p, "P_hat": p, "note": "energy unavailable: performance only"} for p in p_hat]
        e_hat = normalise([c.projected_energy for c in candidates])
        g_hat = normalise([c.progress_per_joule for c in candidates])
        gamma = 1.0 - alpha - beta
        return [
            {"objective": alpha * p + beta * (1 - e) + gamma * g, "P_hat": p, "E_hat": e, "G_hat": g, "alpha": alpha, "beta": beta}
            for p, e, g in zip(p_hat, e_hat, g_hat)
        ]

    return objective


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Pareto dominance for (performance up, energy down)."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def pareto_objective(candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
    """Non-dominated sorting on (score, projected energy) with crowding distance (NSGA-II).

    The objective is ``-front + crowding / (1 + crowding)``: earlier fronts always win, and within a
    front, less crowded points (the extremes have infinite crowding) win.
    """
    if any(c.projected_energy is None for c in candidates):  # never a stand-in 0 J: rank on the score alone
        order = sorted(range(len(candidates)), key=lambda i: -candidates[i].score if math.isfinite(candidates[i].score) else math.inf)
        rank_of = {i: r for r, i in enumerate(order)}
        return [{"objective": -rank_of[i], "front": None, "crowding": None, "note": "energy unavailable: performance only"} for i in range(len(candidates))]
    points = [(c.score, c.projected_energy) for c in candidates]
    n = len(points)
    front = [0] * n
    remaining = set(range(n))
    level = 0
    while remaining:
        current = {i for i in remaining if not any(dominates(points[j], points[i]) for j in remaining if j != i)}
        for i in current:
            front[i] = level
        remaining -= current
        level += 1
    crowding = [0.0] * n
    for f in set(front):
        members = [i for i in range(n) if front[i] == f]
        for axis in (0, 1):
            ordered = sorted(members, key=lambda i: points[i][axis])
            span = points[ordered[-1]][axis] - points[ordered[0]][axis]
            crowding[ordered[0]] = crowding[ordered[-1]] = math.inf
            for k in range(1, len(ordered) - 1):
                if span > 0:
                    crowding[ordered[k]] += (points[ordered[k + 1]][axis] - points[ordered[k - 1]][axis]) / span
    out = []
    for i in range(n):
        c = crowding[i]
        bonus = 1.0 if math.isinf(c) else c / (1.0 + c)
        out.append({"objective": -front[i] + 0.999 * bonus, "front": front[i], "crowding": c})
    return out


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "performance": lambda **_: performance_objective,
    "sm2": lambda alpha=0.5, beta=0.3, **_: sm2_objective(alpha, beta),
    "pareto": lambda **_: pareto_objective,
}


def resolve_objective(objective: str | Objective, **kwargs) -> Objective:
    if callable(objective):
        return objective
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {sorted(OBJECTIVES)} or a callable")
    return OBJECTIVES[objective](**kwargs)


# -------------------------------------------------------------------------------------- decisions


def rank(candidates: Sequence[Candidate], objective: Objective) -> list[tuple[Candidate, dict[str, Any]]]:
    """Candidates with their objective terms, best first. Diverged or unscorable candidates rank
    last; ties break by trial id so decisions are deterministic."""
    healthy = [c for c in candidates if not c.diverged and math.isfinite(c.score)]
    broken = [c for c in candidates if c not in healthy]
    terms = objective(healthy) if healthy else []
    if len(terms) != len(healthy):
        raise ValueError(f"objective returned {len(terms)} records for {len(healthy)} candidates")
    ranked = sorted(zip(healthy, terms), key=lambda ct: (-ct[1]["objective"], ct[0].trial_id))
    return ranked + [(c, {"objective": -math.inf}) for c in sorted(broken, key=lambda c: c.trial_id)]


KEEP_RULES = ("ceil", "floor")


def halve(candidates: Sequence[Candidate], objective: Objective, eta: int, keep: str = "ceil") -> tuple[list[int], list[dict[str, Any]]]:
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
        if keep:
            kept.append(c.trial_id)
            code, reason = "top_k", f"rank {position + 1} of {len(ranked)}: in the top {keep_n}"
        elif not healthy:
            code, reason = ("diverged", f"diverged at step {c.diverged_at}") if c.diverged else ("score_not_finite", "score is not finite")
        else:
            code, reason = "outside_top_k", f"rank {position + 1} of {len(ranked)}: outside the top {keep_n}"
        records.append({**c.terms(), **terms, "objective": terms["objective"] if healthy else None, "kept": keep, "reason_code": code, "reason": reason})
    return kept, records


def exploration_filter(candidates: Sequence[Candidate], *, score_tolerance: float = 0.02, energy_tolerance: float = 0.1) -> tuple[list[int], list[dict[str, Any]]]:
    """SM2's "save more" step after exploratory pretraining.

    A candidate is discarded if it diverged, or if another candidate dominates it by more than the
    tolerances in *both* objectives: ``P_a >= P_b + score_tolerance`` and
    ``E_a <= (1 - energy_tolerance) * E_b``, with ``E`` the projected energy to the full budget. A
    configuration that is better or cheaper than every other (Pareto-optimal) is always kept.
    Without energy figures only divergence discards.
    """
    kept, records = [], []
    healthy = [c for c in candidates if not c.diverged and math.isfinite(c.score)]
    for c in candidates:
        reason, code, dominated_by = "", "", None
        if c.diverged:
            code, reason = "diverged", f"diverged at step {c.diverged_at}"
        elif not math.isfinite(c.score):
            code, reason = "score_not_finite", "score is not finite"
        elif c.projected_energy is not None:
            for other in healthy:
                if other is c or other.projected_energy is None:
                    continue
                if other.score >= c.score + score_tolerance and other.projected_energy <= (1 - energy_tolerance) * c.projected_energy:
                    dominated_by = other
                    break
            if dominated_by is not None:
                code, reason = "dominated", (
                    f"dominated by trial {dominated_by.trial_id}: score {dominated_by.score:.4g} >= {c.score:.4g} + {score_tolerance:g} "
                    f"at {dominated_by.projected_energy:.4g} J <= {1 - energy_tolerance:g} x {c.projected_energy:.4g} J projected"
                )
        keep = not reason
        if keep:
            kept.append(c.trial_id)
            if c.projected_energy is not None:
                code, reason = "not_dominated", "not dominated"
            else:
                code, reason = "energy_unavailable", "not diverged (energy unavailable: no dominance test)"
        records.append({**c.terms(), "kept": keep, "reason_code": code, "reason": reason, "dominated_by": None if dominated_by is None else dominated_by.trial_id})
    return kept, records


# ---------------------------------------------------------------------------------------- budgets


def rung_budgets(min_budget: float, max_budget: float, eta: int) -> list[float]:
    """Cumulative budgets ``r_i = min_budget * eta**i`` up to and including ``max_budget``."""
    if eta < 2:
        raise ValueError(f"eta must be >= 2 (got {eta})")
    if not 0 < min_budget <= max_budget:
        raise ValueError(f"need 0 < min_budget <= max_budget (got {min_budget}, {max_budget})")
    budgets, r = [], float(min_budget)
    while r < max_budget * (1 - 1e-9):
        budgets.append(r)
        r *= eta
    budgets.append(float(max_budget))
    return budgets


def hyperband_brackets(max_budget: float, eta: int = 3, *, integral: bool = False) -> list[dict[str, Any]]:
    """Hyperband's brackets (Li et al. 2018, Algorithm 1), most exploratory first.

    ``s_max = floor(log_eta R)``; bracket ``s`` starts ``n = ceil((s_max + 1) / (s + 1) * eta**s)``
    configurations at budget ``r = R * eta**-s``; its rung ``i`` (0..s) trains
    ``n_i = floor(n * eta**-i)`` configurations to ``r_i = r * eta**i`` and keeps the best
    ``floor(n_i / eta)`` (= ``n_{i+1}``). With ``integral`` (a whole-number R in an integral unit such
    as steps) budgets are ``R * eta**i // eta**s``, as in the paper's integer resources.

    Returns one ``{"s", "n", "r", "rungs": [{"n", "r"}, ...]}`` per bracket.
    """
    if eta < 2:
        raise ValueError(f"eta must be >= 2 (got {eta})")
    if integral and max_budget != int(max_budget):
        raise ValueError(f"integral budgets need a whole-number max_budget (got {max_budget})")
    s_max = int(math.floor(math.log(max_budget) / math.log(eta) + 1e-9))
    out = []
    for s in range(s_max, -1, -1):
        n = math.ceil((s_max + 1) / (s + 1) * eta**s - 1e-9)

        def budget(i, s=s):
            return float(int(max_budget) * eta**i // eta**s) if integral else max_budget * float(eta) ** (i - s)

        rungs = [{"n": n // eta**i, "r": budget(i)} for i in range(s + 1)]
        out.append({"s": s, "n": n, "r": budget(0), "rungs": rungs})
    return out


def steps_for(budget: float, unit: str, batch_size: int, steps_per_epoch: int) -> int:
    """Training steps that a cumulative ``budget`` in ``unit`` means for a cohort (at least 1)."""
    if unit == "steps":
        steps = budget
    elif unit == "samples":
        steps = budget / batch_size
    elif unit == "epochs":
        steps = budget * steps_per_epoch
    else:
        raise ValueError(f"unknown budget unit {unit!r}; known: steps, samples, epochs")
    return max(1, int(math.ceil(steps - 1e-9)))
