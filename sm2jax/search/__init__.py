"""What to try: searchers propose configurations of a search space, and a study keeps what they
proposed (``proposals.json``: never derived again).

A searcher is a :class:`Searcher` registered under a name (a study's ``sampler``). Built in:
``grid`` (every point of the space's grid), ``random`` (independent draws), and the cohort-aware
``sobol``, ``halton`` and ``cohort_random`` (:mod:`sm2jax.sampling`: the static part first, then
traced points filling each cohort in multiples of its vmap width), and the model-based ``tpe``
(:mod:`sm2jax.search.tpe`: Optuna's TPE fitted on the study's results, batched per cohort), which
learns from the results of earlier rounds (:mod:`sm2jax.rounds`). Adding one is a new file::

    from sm2jax.search import Searcher, register_searcher

    class Corners(Searcher):
        name = "corners"

        def propose(self, space, n, *, seed, first_id=0, history=(), multiple=8):
            ...  # n configurations, trial ids first_id.., e.g. from sm2jax.space.make_config

    register_searcher(Corners())

and ``StudySpec(sampler="corners", ...)`` uses it (the module that registered it is recorded in the
study's ``imports``, so ``sm2jax resume`` finds it). A searcher that sets ``learns = True`` is also
given a :class:`SearchContext` (``context=``): the study's objective and the cohorts already compiled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from sm2jax.registry import Registry
from sm2jax.space import Config, SearchSpace


@dataclasses.dataclass(frozen=True)
class Observation:
    """One measured result a searcher may learn from: a configuration's ``values``, the cumulative
    ``budget`` it was scored at, its validation ``score`` (higher is better) and its standard error
    ``score_se``, the ``joules`` spent on it so far and ``train_joules``, what training it to the
    full budget costs (its cohort's measured joules per sample times the full budget's samples);
    ``None``: unavailable. ``round``: the round that proposed it (0: a warm start's)."""

    trial_id: int
    values: dict[str, Any]
    budget: float
    score: float | None
    joules: float | None = None
    score_se: float | None = None
    train_joules: float | None = None
    round: int = 1


@dataclasses.dataclass(frozen=True)
class SearchContext:
    """What a learning searcher (``learns = True``) is told besides the history: the study's
    ``objective`` and final tie width ``final_z`` (what it selects on), and ``compiled``, the
    static values of the cohorts the study has already compiled (a proposal there compiles nothing)."""

    objective: str = "performance"
    final_z: float = 0.5
    compiled: tuple[dict[str, Any], ...] = ()


class Searcher:
    """Proposes configurations of a search space (see the module docstring).

    Attributes:
      name: the name a study's ``sampler`` gives it.
      fixed_size: it proposes a set of its own size (the grid), whatever ``n`` asks for.
      learns: its proposals depend on the history: it is given a :class:`SearchContext`, and a
        study may warm-start it (``warm_start``).
    """

    name: str = ""
    fixed_size: bool = False
    learns: bool = False

    def propose(
        self,
        space: SearchSpace,
        n: int,
        *,
        seed: int,
        first_id: int = 0,
        history: Sequence[Observation] = (),
        multiple: int = 8,
    ) -> list[Config]:
        """``n`` configurations of ``space`` (a searcher may round ``n`` up to fill cohorts), with
        trial ids ``first_id, first_id + 1, ...``, seeded by ``seed``; ``history``: what the study
        measured so far (a model-based searcher learns from it); ``multiple``: a cohort's vmap width."""
        raise NotImplementedError


_SEARCHERS: Registry[Searcher] = Registry("sampler", "sm2jax.search.register_searcher")


def register_searcher(searcher: Searcher) -> Searcher:
    """Makes ``searcher`` a study's ``sampler`` under ``searcher.name``; returns it."""
    return _SEARCHERS.register(searcher)


def get_searcher(name: str) -> Searcher:
    """The searcher registered as ``name``; one line naming the known ones otherwise."""
    return _SEARCHERS.get(name)


def searcher_names() -> list[str]:
    return _SEARCHERS.names()


def _renumber(configs: list[Config], first_id: int) -> list[Config]:
    return [dataclasses.replace(c, trial_id=first_id + i) for i, c in enumerate(configs)]


class GridSearcher(Searcher):
    """Every point of the space's grid (``n`` is ignored)."""

    name, fixed_size = "grid", True

    def propose(self, space, n, *, seed, first_id=0, history=(), multiple=8):
        return _renumber(space.grid(), first_id)


class RandomSearcher(Searcher):
    """``n`` independent draws of every hyperparameter."""

    name = "random"

    def propose(self, space, n, *, seed, first_id=0, history=(), multiple=8):
        return _renumber(space.sample(n, seed), first_id)


class CohortSearcher(Searcher):
    """Cohort-aware quasi-random sampling (:func:`sm2jax.sampling.cohort_sample`): ``n`` rounded up
    to a multiple of the vmap width, in few cohorts."""

    def __init__(self, method: str):
        self.name = self.method = method

    def propose(self, space, n, *, seed, first_id=0, history=(), multiple=8):
        from sm2jax.sampling import cohort_sample

        return _renumber(cohort_sample(space, n, seed=seed, method=self.method, multiple=multiple), first_id)


for _searcher in (GridSearcher(), RandomSearcher(), *(CohortSearcher(m) for m in ("sobol", "halton", "cohort_random"))):
    register_searcher(_searcher)


from sm2jax.search import tpe as _tpe  # noqa: E402  (registers "tpe")

del _tpe
_SEARCHERS.seal()  # the built-in ones are never replaced
