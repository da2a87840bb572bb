r"""Objectives that rank SM2's candidates (see :mod:`sm2jax.schedule.candidates` for the maths of ``sm2``).

An objective maps candidates to records with an ``objective`` term (higher is better);
:func:`resolve_objective` turns a spec's name into one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from sm2jax.schedule.candidates import (
    DEFAULT_ENERGY_Z,
    DEFAULT_NOISE_Z,
    Candidate,
    Objective,
    clearly_better,
    clearly_cheaper,
    non_dominated,
    score_margin,
)

NORMALISE_RTOL = 1e-6


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


def performance_objective(candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
    """Plain successive halving: the validation score alone."""
    return [{"objective": c.score, "P": c.score} for c in candidates]


def blend_objective(alpha: float = 0.5, beta: float = 0.3) -> Objective:
    """The blend ``alpha * P^ + beta * (1 - E^) + (1 - alpha - beta) * G^`` (module docstring).

    Min-max normalisation discards magnitudes and noise: kept as an option, not the default.
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
            {
                "objective": alpha * p + beta * (1 - e) + gamma * g,
                "P_hat": p,
                "E_hat": e,
                "G_hat": g,
                "alpha": alpha,
                "beta": beta,
            }
            for p, e, g in zip(p_hat, e_hat, g_hat)
        ]

    return objective


def sm2_objective(z: float = DEFAULT_NOISE_Z, energy_z: float = DEFAULT_ENERGY_Z) -> Objective:
    """SM2's epsilon-constraint ordering (module docstring): score tiers of width ``z`` standard
    errors, cheapest first inside a tier (energies compared at ``energy_z``).

    The objective value is minus the position in that order; each record says its tier, the best
    score it is tied with, the margin, and how many tier-mates it is clearly cheaper than.
    """
    if z < 0 or energy_z < 0:
        raise ValueError(f"noise multipliers must be >= 0 (got z={z}, energy_z={energy_z})")

    def objective(candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
        remaining = sorted(range(len(candidates)), key=lambda i: (-candidates[i].score, candidates[i].trial_id))
        energy_known = all(c.decision_energy is not None for c in candidates)
        order, info = [], {}
        tier = 0
        while remaining:
            head = candidates[remaining[0]]
            members = [i for i in remaining if not clearly_better(head, candidates[i], z)]
            beats = {i: sum(clearly_cheaper(candidates[i], candidates[j], energy_z) for j in members) for i in members}
            beaten = {i: sum(clearly_cheaper(candidates[j], candidates[i], energy_z) for j in members) for i in members}
            members.sort(key=lambda i: (beaten[i], -candidates[i].score, candidates[i].trial_id))
            for i in members:
                c = candidates[i]
                margin = score_margin(head, c, z)
                if i == remaining[0]:
                    why = f"best score of tier {tier + 1} ({c.score:.4g} +- {c.score_se:.2g})"
                else:
                    why = f"tier {tier + 1}: {c.score:.4g} tied with {head.score:.4g} (difference {head.score - c.score:.3g} <= {margin:.3g})"
                if len(members) > 1:
                    why += (
                        f"; clearly cheaper than {beats[i]}, clearly dearer than {beaten[i]} of its {len(members)} tier-mates"
                        if energy_known
                        else "; energy unavailable: tier ordered by score"
                    )
                info[i] = {
                    "tier": tier + 1,
                    "tier_size": len(members),
                    "tied_with": head.trial_id,
                    "margin": margin,
                    "cheaper_than": beats[i],
                    "dearer_than": beaten[i],
                    "why": why,
                }
            order += members
            taken = set(members)
            remaining = [i for i in remaining if i not in taken]
            tier += 1
        position = {i: p for p, i in enumerate(order)}
        return [
            {"objective": -float(position[i]), "z": z, "energy_z": energy_z, **info[i]} for i in range(len(candidates))
        ]

    return objective


def pareto_objective(candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
    """Non-dominated sorting on (score, projected energy) with crowding distance (NSGA-II).

    The objective is ``-front + crowding / (1 + crowding)``: earlier fronts always win, and within a
    front, less crowded points (the extremes have infinite crowding) win.
    """
    if any(c.projected_energy is None for c in candidates):  # never a stand-in 0 J: rank on the score alone
        order = sorted(
            range(len(candidates)),
            key=lambda i: -candidates[i].score if math.isfinite(candidates[i].score) else math.inf,
        )
        rank_of = {i: r for r, i in enumerate(order)}
        return [
            {"objective": -rank_of[i], "front": None, "crowding": None, "note": "energy unavailable: performance only"}
            for i in range(len(candidates))
        ]
    points = [(c.score, c.projected_energy) for c in candidates]
    n = len(points)
    front = [0] * n
    remaining = set(range(n))
    level = 0
    while remaining:
        order = sorted(remaining)
        current = {order[k] for k in non_dominated([points[i] for i in order])}
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


def cost_to_target_objective(target: float) -> Objective:
    """Energy to reach a target score (the cost-to-target of Zeus, You et al., NSDI 2023, with
    all weight on energy): a candidate whose score reached ``target`` ranks by the joules it
    spent to get there (fewer first), ahead of every candidate that has not, which rank by score.

    Where any candidate's energy is unavailable, the reached ones rank by score too; each record
    says so (never a stand-in 0 J).
    """
    if not math.isfinite(target):
        raise ValueError(f"target_score must be a finite score (got {target})")

    def objective(candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
        known = all(c.energy_spent is not None for c in candidates)
        reached = [math.isfinite(c.score) and c.score >= target for c in candidates]

        def key(i: int) -> tuple:
            c = candidates[i]
            score = c.score if math.isfinite(c.score) else -math.inf
            if reached[i]:
                return (0, c.energy_spent if known else -score, c.trial_id)
            return (1, -score, c.trial_id)

        position = {i: p for p, i in enumerate(sorted(range(len(candidates)), key=key))}
        note = {} if known else {"note": "energy unavailable: reached ones ordered by score"}
        return [
            {
                "objective": -float(position[i]),
                "target": target,
                "reached": reached[i],
                "energy_to_target": c.energy_spent if reached[i] else None,
                **note,
            }
            for i, c in enumerate(candidates)
        ]

    return objective


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "performance": lambda **_: performance_objective,
    "sm2": lambda z=DEFAULT_NOISE_Z, energy_z=DEFAULT_ENERGY_Z, **_: sm2_objective(z, energy_z),
    "blend": lambda alpha=0.5, beta=0.3, **_: blend_objective(alpha, beta),
    "pareto": lambda **_: pareto_objective,
    "cost_to_target": lambda target_score=None, **_: cost_to_target_objective(
        math.nan if target_score is None else target_score
    ),
}


def resolve_objective(objective: str | Objective, **kwargs) -> Objective:
    if callable(objective):
        return objective
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {sorted(OBJECTIVES)} or a callable")
    return OBJECTIVES[objective](**kwargs)
