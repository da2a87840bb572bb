"""What a study proposed, as its folder keeps it, and what a searcher learns from another study.

:func:`study_proposals` reads ``proposals.json`` (a study never proposes
again what it proposed once); :func:`warm_observations` reads a warm start's results (another study
of the same space) as the observations that seed a first round's model (:mod:`sm2jax.rounds`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from sm2jax.rounds import Proposals, observations, round_sizes, schedule
from sm2jax.search import Observation
from sm2jax.space import Config, SearchSpace
from sm2jax.spec import StudySpec, read_spec
from sm2jax.store.folder import StudyDir


def warm_observations(spec: Any) -> list[Observation]:
    """The results of the study in ``spec.warm_start`` (another study of the same space), as
    observations of round 0 with negative trial ids (they are never this study's trials)."""
    if spec.warm_start is None:
        return []
    from sm2jax.phases import StudyState

    where = os.path.abspath(spec.warm_start)
    folder = StudyDir(where)
    if folder.spec_blob() is None or not folder.saved_phases():
        raise ValueError(
            f"warm_start: {where} holds no study that has finished a phase: name a study folder of the same space, or drop warm_start"
        )
    other = read_spec(where)
    if SearchSpace.from_json(other.space).to_json() != SearchSpace.from_json(spec.space).to_json():
        differ = sorted(k for k in {*other.space, *spec.space} if other.space.get(k) != spec.space.get(k))
        raise ValueError(
            f"warm_start: {where} searched another space (differs in: {', '.join(differ)}): warm-start from a study of the same space"
        )
    state = StudyState.from_json(folder.load_progress(folder.saved_phases()[-1]))
    proposals, _ = study_proposals(folder, other)
    budgets = {s.label: s.budget for s in schedule(other)}
    found = observations(
        state.trials,
        {c.trial_id: c for c in proposals.all()},
        budgets,
        state.cohort_energy,
        replicate_of=proposals.replicate_of,
        round_of={},
    )
    return [dataclasses.replace(o, trial_id=-1 - o.trial_id, round=0) for o in found]


def study_proposals(folder: StudyDir, spec: StudySpec) -> tuple[Proposals, bool]:
    """What the study in ``folder`` proposed, every round, as ``proposals.json`` keeps it -- never
    proposed again -- or, for a study not started (or from before proposals were kept), what
    ``spec`` proposes now for its first round (:func:`first_proposals`). The flag says whether they
    were kept (else the caller keeps them once the folder is claimed)."""
    ran = folder.has_run()
    blob = folder.read_proposals() if ran else None  # a start that failed proposes again
    if blob is None:
        return Proposals(*(_as_first_drawn(spec) if ran else first_proposals(spec))), False
    try:
        return Proposals.from_json(blob), True
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(
            f"{folder.proposals_path} is damaged ({type(err).__name__}: {err}): restore it from a backup (it holds what the study trained)"
        ) from None


def first_proposals(spec: StudySpec) -> tuple[list[Config], dict[int, int]]:
    """What a new study's first round trains: ``spec``'s proposals, from its warm start's results."""
    return spec.proposals(warm_observations(spec))


def _as_first_drawn(spec: StudySpec) -> tuple[list[Config], dict[int, int]]:
    """A study from before proposals were kept (it has run, and has no ``proposals.json``): its first
    round drawn again as it was drawn then, so that it resumes on what it trained. Random draws of
    a log-scaled integer were ``round(exp(U(log low, log high)))`` then (one mapping is used by
    every searcher since: :meth:`~sm2jax.space.IntUniform.value_at`); everything else is drawn as
    it always was. The caller keeps them (``proposals.json``), so this happens once."""
    space = SearchSpace.from_json(spec.space)
    if spec.effective().sampler != "random" or not space.rounded_log_ints():
        return first_proposals(spec)
    return spec.proposals(configs=space.sample(round_sizes(spec)[0], spec.seed, rounded_log_ints=True))


def round_history(spec: StudySpec, state: Any, configs: dict[int, Config], proposals: Proposals) -> list[Observation]:
    """What a study's next round is proposed from: every result of its rounds so far, at every
    budget reached (``state``: its :class:`~sm2jax.phases.StudyState`), and its warm start's."""
    found = observations(
        state.trials,
        configs,
        {s.label: s.budget for s in schedule(spec)},
        state.cohort_energy,
        replicate_of=proposals.replicate_of,
        round_of=proposals.round_of(),
    )
    return found + warm_observations(spec)
