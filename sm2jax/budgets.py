"""Budgets: successive-halving rungs, Hyperband's brackets, and steps from a budget's unit."""

from __future__ import annotations

import math
from typing import Any


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
    s_max = math.floor(math.log(max_budget) / math.log(eta) + 1e-9)
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
    return max(1, math.ceil(steps - 1e-9))
