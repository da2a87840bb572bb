r"""A model-based searcher, batched per cohort: Optuna's TPE through ask-and-tell (``sampler="tpe"``).

The density model is Optuna's :class:`~optuna.samplers.TPESampler` (Bergstra et al., NeurIPS 2011;
Watanabe, arXiv 2304.11127), multivariate, with ``constant_liar`` so that a batch of proposals
asked before any is scored spreads out instead of piling onto one mode. We do not write TPE again;
what is ours is what it is fitted on and how its proposals become cohorts.

**What it learns from** (the BOHB rule, Falkner et al., ICML 2018). The study hands over every
result of earlier rounds at every budget reached (:class:`~sm2jax.search.Observation`). The model
is fitted on the observations at the largest budget that has at least :math:`d + 1` of them
(:math:`d`: the searched dimensions), and at least :data:`MIN_OBSERVATIONS`: there the scores mean
most, and below it the model would rest on too few points. With fewer observations at every budget
(a first round) it proposes as the cohort-aware Sobol' searcher does.

**What it models.** With a performance objective, the validation score. With SM2's objective the
study selects on the score and, among scores tied within the noise, on the energy to train; the
model is fitted on the same trade, as one number:

.. math::  v_i = s_i - z_f \,\bar\sigma \,\log_2 (E_i / E_{\min}),

:math:`E_i` being configuration :math:`i`'s energy to train (its cohort's measured joules per sample
times the samples of the full budget), :math:`\bar\sigma` the median standard error of the scores and
:math:`z_f` the final rung's tie width (``final_z``): a configuration twice as costly to train must
score :math:`z_f` standard errors better to be rated as well, which is exactly as much as SM2's final
rung lets energy weigh. So the search learns which configurations are good *and* cheap to train,
never trading more accuracy for energy than the selection would.

**Batched per cohort.** Configurations that differ in a static hyperparameter (model, batch size,
optimizer) cannot share a compiled program, so proposals are made in two steps:

1. the static part: ``n`` free proposals are asked; each static combination gets blocks of
   ``multiple`` rows (a vmap width), one at a time, to the combination with the most proposals not
   yet placed (D'Hondt's rule, :func:`allocate_blocks`) -- a combination that is already compiled
   is preferred where the model rates it as well, within the sampling noise of the count, so a
   round that the model rates as well on existing cohorts compiles nothing;
2. the traced part: each chosen combination keeps its own free proposals and is filled to its
   blocks by proposals asked with the static part fixed (``enqueue_trial``), so every row of a
   cohort is the model's proposal given that cohort.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import statistics
import warnings
from collections.abc import Collection, Iterator, Sequence
from typing import Any

from sm2jax.phases import finite_or_none
from sm2jax.search import Observation, SearchContext, Searcher, register_searcher
from sm2jax.space import Categorical, Fixed, IntUniform, LogUniform, SearchSpace, Uniform, make_config

MIN_OBSERVATIONS = 6
"""The fewest observations at one budget the model is fitted on (with at least ``d + 1``)."""


def fitting_budget(history: Sequence[Observation], dims: int) -> float | None:
    """The largest budget with at least ``max(dims + 1, MIN_OBSERVATIONS)`` scored observations of
    distinct configurations (BOHB's rule); ``None`` when no budget has that many."""
    need = max(dims + 1, MIN_OBSERVATIONS)
    counts = collections.Counter(o.budget for o in history if finite_or_none(o.score) is not None)
    enough = [b for b, n in counts.items() if n >= need]
    return max(enough) if enough else None


def model_values(observations: Sequence[Observation], objective: str, final_z: float) -> list[float]:
    """What the model is fitted on, per observation (see the module docstring): the score, or with
    SM2's objective the score less ``final_z`` median standard errors per doubling of the energy
    to train (the score alone where any energy is unknown)."""
    scores = [float(o.score) for o in observations]
    energies = [o.train_joules for o in observations]
    if objective != "sm2" or any(e is None or not e > 0 for e in energies):
        return scores
    errors = [o.score_se for o in observations if o.score_se is not None and math.isfinite(o.score_se)]
    sigma = statistics.median(errors) if errors else 0.0
    low = min(energies)
    return [s - final_z * sigma * math.log2(e / low) for s, e in zip(scores, energies)]


class TPESearcher(Searcher):
    """Optuna's TPE fitted on a study's results, its proposals batched per cohort (module docstring)."""

    name = "tpe"
    learns = True

    def propose(self, space, n, *, seed, first_id=0, history=(), multiple=8, context=None):
        import optuna

        context = context or SearchContext()
        codec = _Codec(space)
        budget = fitting_budget(history, len(codec.distributions))
        if budget is None or not codec.distributions:  # nothing to learn from yet: cover the space evenly
            from sm2jax.sampling import cohort_sample

            configs = cohort_sample(space, n, seed=seed, method="sobol", multiple=multiple)
            return [make_config(first_id + i, **c.values) for i, c in enumerate(configs)]
        fitted = _latest_per_trial([o for o in history if o.budget == budget and finite_or_none(o.score) is not None])
        values = model_values(fitted, context.objective, context.final_z)
        with _quiet_optuna():
            sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=0)
            study = optuna.create_study(direction="maximize", sampler=sampler)
            study.add_trials(
                [
                    optuna.trial.create_trial(
                        params=codec.encode(o.values), distributions=codec.distributions, value=float(v)
                    )
                    for o, v in zip(fitted, values)
                    if codec.admits(o.values)
                ]
            )
            rows = _batched(study, codec, n, multiple, context.compiled)
        return [make_config(first_id + i, **codec.decode(params)) for i, params in enumerate(rows)]


def _batched(study: Any, codec: _Codec, n: int, multiple: int, compiled: Sequence[dict[str, Any]]) -> list[dict]:
    """``n`` (rounded up to ``multiple``) proposals in blocks of ``multiple`` per static combination."""
    blocks = max(1, math.ceil(n / multiple))
    free = [study.ask(codec.distributions).params for _ in range(blocks * multiple)]
    known = {codec.static_of(codec.encode(c)) for c in compiled if codec.admits(c)}
    given = allocate_blocks([codec.static_of(p) for p in free], blocks, known)
    rows: list[dict] = []
    for combo in given:
        own = [p for p in free if codec.static_of(p) == combo][: given[combo] * multiple]
        for _ in range(given[combo] * multiple - len(own)):
            study.enqueue_trial(dict(zip(codec.static, combo)), skip_if_exists=False)
            own.append(study.ask(codec.distributions).params)
        rows += own
    return rows


def allocate_blocks(combos: Sequence[Any], blocks: int, compiled: Collection[Any] = ()) -> dict[Any, int]:
    r"""Blocks of rows per static combination, from the combinations of the model's free proposals
    (in the order asked). One block at a time goes to the combination with the largest quotient
    :math:`q_c = n_c / (b_c + 1)` (D'Hondt's rule: :math:`n_c` proposals, :math:`b_c` blocks given);
    a compiled combination counts as :math:`q_c + \sqrt{q_c}`: rated as well, within the sampling
    noise of a proposal count, it is preferred (it compiles nothing). Returns combination ->
    blocks, in the order the combinations were first proposed."""
    count = collections.Counter(combos)
    first = {c: i for i, c in reversed(list(enumerate(combos)))}
    given: dict[Any, int] = collections.Counter()

    def quotient(c: Any) -> tuple:
        q = count[c] / (given[c] + 1)
        return (q + math.sqrt(q) if c in compiled else q, c in compiled, -first[c])

    for _ in range(blocks):
        given[max(count, key=quotient)] += 1
    return {c: given[c] for c in sorted(given, key=first.__getitem__)}


class _Codec:
    """A :class:`SearchSpace` as Optuna distributions: numbers as floats or integers (log where the
    domain is), every categorical and static choice as its JSON text (a model is a mapping), a
    static numeric domain as the choices of its grid (a cohort per grid point, as Sobol' makes)."""

    def __init__(self, space: SearchSpace):
        import optuna.distributions as od

        from sm2jax.sampling import static_names

        self.space, self.fixed = space, {n: d.value for n, d in space.domains.items() if isinstance(d, Fixed)}
        static = set(static_names(space))
        self.static = [n for n in space.domains if n in static and n not in self.fixed]
        self.choices: dict[str, dict[str, Any]] = {}
        self.distributions: dict[str, Any] = {}
        for name, d in space.domains.items():
            if name in self.fixed:
                continue
            if isinstance(d, Categorical) or name in static:
                self.choices[name] = {_text(v): v for v in d.grid()}
                self.distributions[name] = od.CategoricalDistribution(list(self.choices[name]))
            elif isinstance(d, IntUniform):
                self.distributions[name] = od.IntDistribution(d.low, d.high, log=d.log)
            elif isinstance(d, (LogUniform, Uniform)):
                self.distributions[name] = od.FloatDistribution(d.low, d.high, log=isinstance(d, LogUniform))

    def encode(self, values: dict[str, Any]) -> dict[str, Any]:
        return {n: (_text(values[n]) if n in self.choices else values[n]) for n in self.distributions}

    def decode(self, params: dict[str, Any]) -> dict[str, Any]:
        out = dict(self.fixed)
        out.update({n: (self.choices[n][v] if n in self.choices else v) for n, v in params.items()})
        return out

    def admits(self, values: dict[str, Any]) -> bool:
        """Whether ``values`` lie in this space (a warm start's or an earlier round's configuration)."""
        import optuna.distributions as od

        try:
            encoded = self.encode(values)
        except (KeyError, TypeError):
            return False
        for name, value in encoded.items():
            d = self.distributions[name]
            if isinstance(d, od.CategoricalDistribution):
                if value not in d.choices:
                    return False
            elif not (isinstance(value, (int, float)) and d.low <= value <= d.high):
                return False
        return True

    def static_of(self, params: dict[str, Any]) -> tuple:
        return tuple(params[n] for n in self.static)


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _latest_per_trial(observations: list[Observation]) -> list[Observation]:
    """One observation per configuration (its last at the budget), in trial order."""
    by_trial = {o.trial_id: o for o in observations}
    return [by_trial[t] for t in sorted(by_trial)]


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna's per-trial INFO lines and its experimental-feature warnings (multivariate,
    constant liar) are not the study's to show."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


register_searcher(TPESearcher())
