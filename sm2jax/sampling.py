"""Cohort-aware sampling: the static part of a space first, then traced samples to fill each cohort.

Independent random sampling of a space with static hyperparameters (optimizer, model, batch size)
scatters the draws over every static combination; with a continuous static value (a dropout rate a
model takes static) each draw opens a cohort of its own, compiled cold. Here the static part is
drawn first and each static combination drawn gets its traced samples in blocks of ``multiple``
(a vmap width), so N configurations open at most ``ceil(N / multiple)`` cohorts, and no more than
the space has static combinations::

    combos  = product of the static domains' grids          (C combinations)
    blocks  = ceil(N / multiple)
    blocks >= C: every combination gets blocks // C blocks, a seeded choice of blocks % C one more
    blocks <  C: a seeded choice of `blocks` combinations gets one block each
    per combination: n points of the traced domains from a d-dimensional sequence in [0, 1)^d,
                     mapped through each domain (uniform, log-uniform, integer, categorical)

The sequence is scrambled Sobol' (Owen-scrambled, Joe & Kuo directions) or Halton from
``scipy.stats.qmc``, or plain uniform random; quasi-random points cover the traced box more evenly
than independent draws (a lower discrepancy), which matters at a few dozen points per cohort.
The total is N rounded up to a multiple of ``multiple``.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import numpy as np

from sm2jax.space import DEFAULTS, Config, SearchSpace, make_config
from sm2jax.vocabulary import STATIC

METHODS = ("sobol", "halton", "cohort_random")
"""Cohort-aware samplers (a study's ``sampler``); ``random`` draws every value independently."""


def static_names(space: SearchSpace) -> list[str]:
    """The names of ``space`` that fix a cohort: the static vocabulary, and ``dropout`` where a model
    of the space takes its rate static."""
    from sm2jax.models import traced_dropout

    names = [n for n in space.domains if n in STATIC]
    models = space.domains["model"].grid() if "model" in space.domains else [DEFAULTS["model"]]
    if "dropout" in space.domains and not all(traced_dropout(m if isinstance(m, str) else m["name"]) for m in models):
        names.append("dropout")
    return names


def from_unit(domain: Any, u: float) -> Any:
    """The value of ``domain`` at ``u`` in [0, 1): the inverse of its distribution function, the one
    mapping every searcher uses (:meth:`~sm2jax.space.Uniform.value_at` and its kin)."""
    return domain.value_at(min(max(float(u), 0.0), np.nextafter(1.0, 0.0)))


def unit_points(method: str, n: int, d: int, seed: int) -> np.ndarray:
    """``n`` points in ``[0, 1)^d`` from ``method``, seeded."""
    if d == 0:
        return np.zeros((n, 0))
    if method == "cohort_random":
        return np.random.default_rng(seed).random((n, d))
    from scipy.stats import qmc

    engine = qmc.Sobol(d, scramble=True, seed=seed) if method == "sobol" else qmc.Halton(d, scramble=True, seed=seed)
    with warnings.catch_warnings():  # Sobol' balance holds exactly at powers of 2; others are still fine
        warnings.simplefilter("ignore", UserWarning)
        return engine.random(n)


def cohort_sample(space: SearchSpace, num: int, *, seed: int = 0, method: str = "sobol", multiple: int = 8):
    """``num`` configurations (rounded up to a multiple of ``multiple``) that fill few cohorts.

    Args:
      space: the search space.
      num: how many configurations to draw (at least 1).
      seed: seeds the choice of static combinations and every sequence.
      method: ``sobol``, ``halton`` or ``cohort_random`` (see the module docstring).
      multiple: configurations per static combination come in multiples of this (a vmap width).

    Returns:
      Configurations with trial ids ``0..`` in the order of their static combinations.
    """
    if method not in METHODS:
        raise ValueError(f"sampler: unknown {method!r}; known: {', '.join(METHODS)}")
    if num < 1 or multiple < 1:
        raise ValueError(f"cohort sampling needs num >= 1 and multiple >= 1 (got {num}, {multiple})")
    static = static_names(space)
    traced = [n for n in space.domains if n not in static]
    combos = list(itertools.product(*(space.domains[n].grid() for n in static)))
    rng = np.random.default_rng(seed)
    blocks = math.ceil(num / multiple)
    order = rng.permutation(len(combos))
    counts = np.zeros(len(combos), int)
    counts += blocks // len(combos)
    counts[order[: blocks % len(combos)]] += 1
    configs: list[Config] = []
    for index, (combo, count) in enumerate(zip(combos, counts)):
        if count == 0:
            continue
        n = int(count) * multiple
        points = unit_points(method, n, len(traced), seed=int(rng.integers(2**31)) + index)
        for row in points:
            values = dict(zip(static, combo))
            values.update({name: from_unit(space.domains[name], u) for name, u in zip(traced, row)})
            configs.append(make_config(len(configs), **values))
    return configs
