"""What defines a study (:class:`StudySpec`), reading it back from a folder, and the modules it needs.

The spec is the study's one persisted definition (``spec.json``, see :mod:`sm2jax.store.folder`):
the search space, data set, budgets and decision rules. Everything else a study records is derived
from it and the hardware it runs on.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import math
import os
from collections.abc import Sequence
from typing import Any

from sm2jax.budgets import rung_budgets, steps_for
from sm2jax.data import BUILTIN_DATASETS, ArrayDataset, check_dataset_options, registered_dataset
from sm2jax.energy.ledger import DEFAULT_INTENSITY_G_PER_KWH
from sm2jax.energy.meters import DEFAULT_WATTS_PER_CORE
from sm2jax.rounds import check_rounds, propose, round_sizes
from sm2jax.schedule import get_scheduler
from sm2jax.schedule.candidates import (
    DEFAULT_ENERGY_NOISE,
    DEFAULT_ENERGY_Z,
    DEFAULT_EXPLORE_KEEP,
    DEFAULT_EXPLORE_Z,
    DEFAULT_FINAL_Z,
    DEFAULT_NOISE_Z,
    KEEP_RULES,
)
from sm2jax.search import get_searcher
from sm2jax.space import Config, SearchSpace, make_config
from sm2jax.store.folder import StudyDir
from sm2jax.tasks import TASKS, get_task

REPLICATE_SEED_OFFSET = 1_000_003
"""A replicate's seed is its configuration's plus this (mod 2**31); its trial id differs too."""

DEFAULT_MAX_CONFIGURATIONS = 10_000
"""A study of more configurations than this is refused before anything is made (``--set
max_configurations=N`` raises it): drawing or listing 10^8 of them takes minutes and ~100 GB."""


def _check_type(name: str, annotation: str, value: Any) -> None:
    """One-line errors for a field whose value has the wrong type (a JSON value from ``--set``)."""
    if value is None and "None" in annotation:
        return
    base = annotation.split("|")[0].strip()
    example = {"int": "3", "float": "0.5", "bool": "true", "str": "NAME"}.get(base, "...")
    if base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        kind = "an integer"
    elif base == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        kind = "a finite number"
    elif base == "bool":
        ok, kind = isinstance(value, bool), "true or false"
    elif base == "str":
        ok, kind = isinstance(value, str), "a string"
    elif base.startswith("dict"):
        ok, kind = isinstance(value, dict), "a mapping (JSON object)"
    elif base.startswith("list"):
        ok, kind = isinstance(value, (list, tuple)), "a list (JSON array)"
    else:
        return
    if not ok:
        raise ValueError(f"{name} must be {kind} (got {value!r}), e.g. --set {name}={example}")


_RANGES = (  # (field, bound, bound allowed)
    ("num_samples", 1, True),
    ("rounds", 1, True),
    ("max_configurations", 1, True),
    ("replicates", 0, True),
    ("seed", 0, True),
    ("max_train_examples", 1, True),
    ("max_val_examples", 1, True),
    ("min_budget", 0, False),
    ("alpha", 0, True),
    ("beta", 0, True),
    ("plateau_tolerance", 0, True),
    ("watts_per_core", 0, False),
    ("idle_seconds", 0, True),
    ("carbon_intensity", 0, True),
    ("width", 1, True),
    ("memory_limit_bytes", 1, True),
    ("window_seconds", 0, False),
    ("optuna_seconds", 0, True),
    ("steps_per_window", 1, True),
    ("max_energy_joules", 0, False),
    ("max_wall_seconds", 0, False),
)
_RANGE_HINTS = {
    "seed": "it seeds every configuration's keys",
    "rounds": "the rounds of proposals num_samples is split over, e.g. --set rounds=3 (1: every configuration at the start)",
    "carbon_intensity": "grams of CO2e per kWh of the grid (475 is a world average)",
    "width": "the largest vmap width (leave it unset for all trials of a cohort)",
    "memory_limit_bytes": "bytes a program may use (leave it unset for the device's memory)",
    "steps_per_window": "training steps per energy window (leave it unset to size windows by window_seconds)",
    "max_energy_joules": "the study's energy budget, e.g. --budget-kwh 2 (leave it unset for no cap)",
    "max_wall_seconds": "the study's wall-time budget, e.g. --budget-hours 1.5 (leave it unset for no cap)",
}


@dataclasses.dataclass
class StudySpec:
    """Everything that defines a study (JSON-serialisable).

    Attributes:
      space: a :meth:`SearchSpace.to_json` mapping.
      sampler: ``grid``; ``random`` (``num_samples`` configurations, every value drawn
        independently, seeded by ``seed``); or a cohort-aware ``sobol``, ``halton`` or
        ``cohort_random`` (:mod:`sm2jax.sampling`: static combinations first, each filled with
        traced samples in multiples of ``width``, 8 when unset).
      max_configurations: a grid or sample of more configurations than this is refused in one line
        before anything is made (default :data:`DEFAULT_MAX_CONFIGURATIONS`); it changes nothing a
        study trains.
      dataset: name for :func:`sm2jax.data.load_dataset` (built in or registered with
        :func:`sm2jax.register_dataset`); ``dataset_options`` its keyword arguments. With
        ``Study(..., dataset=ds)`` it is set to ``ds.name``.
      task: a registered task (:func:`sm2jax.register_task`) to train and score with instead of the
        data set's own (your loss on a built-in data set); ``None``: the data set's.
      dataset_fingerprint: set by ``Study(..., dataset=ds)``: the in-memory data set's
        :meth:`~sm2jax.data.ArrayDataset.fingerprint`; resuming needs the same arrays again.
      imports: modules imported before the study runs or resumes. A study adds the importable
        modules that registered the models, data set and task it uses, so ``sm2jax resume`` finds
        them (``sm2jax run --import MODULE`` adds one by hand).
      max_train_examples, max_val_examples: optional truncation (quick runs, tests).
      mode: the scheduler (:mod:`sm2jax.schedule`): ``sm2`` (exploration + energy-aware halving),
        ``sh`` (plain successive halving: it runs without exploration, replicates or an
        energy-aware objective, whatever those fields say -- :meth:`effective`; they are kept as
        written), ``full`` (every configuration to the full budget), ``hyperband`` (Li et al.'s
        brackets as the study's rounds, each its own size and rungs up to ``max_budget``; with
        ``sampler="tpe"``, BOHB: :class:`sm2jax.schedule.HyperbandScheduler`), or one registered
        with :func:`sm2jax.schedule.register_scheduler`.
      budget_unit: ``steps``, ``samples`` or ``epochs``; budgets are cumulative per configuration.
      explore_budget: SM2's exploratory pretraining budget (0 disables); must be below ``min_budget``.
      replicates: SM2's seed replicates per cohort: that many of its configurations (evenly spaced in
        its order; at most one per four configurations) also explore with other keys, side by side in
        the same program, to measure the seed noise exploration's drops add to the split's sampling
        noise (:func:`sm2jax.schedule.candidates.seed_noise`); never selected, they stop after exploration. 0
        disables; ``sh``, ``full`` and a study without exploration use none.
      min_budget, max_budget, eta: successive-halving rungs ``min_budget * eta**i`` up to ``max_budget``.
      rungs: explicit cumulative rung budgets instead (first ``min_budget``, last ``max_budget``), e.g.
        Hyperband's integral budgets.
      keep_rule: ``ceil`` keeps ``ceil(n / eta)`` per rung (successive halving), ``floor`` keeps
        ``floor(n / eta)`` (Hyperband's inner loop, Li et al. 2018); at least one either way.
      objective: ``sm2`` (epsilon-constraint: energy decides only among scores tied within the noise,
        see :mod:`sm2jax.schedule.candidates`), ``performance``, ``blend``, ``pareto`` or ``cost_to_target``
        (the energy to reach ``target_score``; a callable via
        :class:`Study` directly).
      noise_z: at a rung before the last, two scores are tied unless they differ by more than
        ``noise_z`` standard errors of their difference, and a cheaper tier-mate goes first. 0 (the
        default): the rungs rank by score as successive halving's do (energy-ordered tiers at 0.5 and
        at 1 lost successive halving's winner, a large model that learns slower, on MNIST-1D).
      final_z: the tie width at the final rung, where energy is already spent: the selection is by
        score, and only scores within ``final_z`` standard errors go to the one cheaper to train (at
        one standard error the better-scoring configuration is truly better with probability ~0.84:
        too likely to give up for energy that is sunk).
      energy_z: likewise for two energies, whose noise has heavier tails.
      explore_z: the clear margin, in standard errors, exploration needs to drop a configuration.
      explore_keep: exploration also halves each cohort: of its ``k`` configurations at most
        ``ceil(explore_keep * k)`` go on, best score first (:func:`sm2jax.schedule.halving.exploration_filter`).
        A cohort's configurations share their model, batch size and energy per step, so this is a
        rank decision between like and like, as successive halving makes at every rung; across
        cohorts (other models learn at other speeds) exploration still drops only the clearly worse.
        1 keeps every configuration that survives the clear-margin test.
      rung_z: off (``None``) by default; with a value, an SM2 rung before the last also drops the
        configurations of its top ``1/eta`` clearly worse than its best by ``rung_z`` standard errors
        (sampling and exploration's seed noise; :func:`sm2jax.schedule.halving.drop_clearly_worse`). It
        saves energy but narrows the next rung: on MNIST-1D it lost successive halving's winner, a
        large model that learns slower, on one seed of five at 1 and at 2 standard errors.
      energy_noise: relative uncertainty of a cohort's energy rate (default 20%, about the spread of
        identical runs' windows).
      alpha, beta: weights of the ``blend`` objective.
      plateau_tolerance: a score gain at or below this over a budget flags the candidate's learning
        rate as plateaued (recorded with its decision; the ``blend`` objective's G term penalises it).
      energy_method: ``auto`` or a method of :data:`sm2jax.energy.METHODS`.
      watts_per_core: the ``estimated`` method's per-core power.
      idle_seconds: idle-baseline measurement before the study (0 skips it: net energy unavailable).
      carbon_intensity: gCO2e per kWh.
      probe_width: measure the fastest vmap width per cohort when it pays (see :mod:`sm2jax.execute.runner`).
      quick_compile: on a CPU backend, start each cohort with a quick-compiling training program and
        compile the optimised one only when the cohort's remaining training pays for it (see
        :mod:`sm2jax.execute.runner`); ``False`` always uses the optimised program.
      width_start: ``auto`` (width 1 on a CPU backend, the widest that fits on accelerators),
        ``narrowest`` or ``widest``; ``width`` caps the width.
      memory_limit_bytes: device memory cap for the hardware filter (default: the device's).
      window_seconds: target length of an energy window (NVML counters need >= ~1 s).
      optuna_seconds: with Optuna installed, ``optuna.db`` is rewritten (on a thread of its own) after
        a committed phase once this many seconds passed since the study started or last wrote it,
        and after the last phase of a study that wrote it before, so optuna-dashboard follows a
        long study while a short one pays nothing (each rewrite costs ~0.4 s of CPU, the first ~1.3
        s; ``sm2jax report`` writes it in any case). 0: after every phase. It changes nothing trained.
      steps_per_window: fixed steps per energy window (overrides ``window_seconds``).
      max_energy_joules, max_wall_seconds: the study's budget in joules (``--budget-kwh``) and in
        wall seconds (``--budget-hours``), its whole span over every attempt. Before each phase
        after the first, the study predicts the phase's cost from the rates it measured
        (:mod:`sm2jax.plan`) and, if the upper end would exceed what is left, ends cleanly: the
        phase just finished becomes the last (its best configuration is selected, saying so).
        ``sm2jax resume DIR --budget-kwh MORE`` continues it. A start whose first phase the plan
        says needs more is refused in one line. Neither changes what a phase trains: both may
        change on resume. ``None``: no cap.
      target_score: the score the ``cost_to_target`` objective asks for: configurations that
        reached it rank by the energy they spent to reach it, before every one that has not.
      rounds: the schedule runs over this many rounds of proposals, ``num_samples`` split over
        them; round ``k`` is proposed from every result of the rounds before (:mod:`sm2jax.rounds`;
        with ``sampler="tpe"`` a model learns from them). 1: every configuration at the start.
      extensions: the rounds ``sm2jax extend`` added, each ``{"samples": N, "rounds": R}`` (the
        spec records the study's growth; write them with ``extend``, not by hand).
      warm_start: a folder holding another study of the same space, whose results seed the model
        of the first round (a searcher that learns); its configurations are not trained again.
    """

    space: dict[str, Any]
    sampler: str = "grid"
    num_samples: int = 16
    max_configurations: int = DEFAULT_MAX_CONFIGURATIONS
    seed: int = 0
    dataset: str = "digits"
    dataset_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    task: str | None = None
    max_train_examples: int | None = None
    max_val_examples: int | None = None
    mode: str = "sm2"
    budget_unit: str = "epochs"
    explore_budget: float = 0.25
    replicates: int = 2
    min_budget: float = 1.0
    max_budget: float = 9.0
    eta: int = 3
    rungs: list[float] | None = None
    keep_rule: str = "ceil"
    objective: str = "sm2"
    noise_z: float = DEFAULT_NOISE_Z
    final_z: float = DEFAULT_FINAL_Z
    energy_z: float = DEFAULT_ENERGY_Z
    explore_z: float = DEFAULT_EXPLORE_Z
    explore_keep: float = DEFAULT_EXPLORE_KEEP
    rung_z: float | None = None
    energy_noise: float = DEFAULT_ENERGY_NOISE
    alpha: float = 0.5
    beta: float = 0.3
    plateau_tolerance: float = 0.005
    energy_method: str = "auto"
    watts_per_core: float = DEFAULT_WATTS_PER_CORE
    idle_seconds: float = 2.0
    carbon_intensity: float = DEFAULT_INTENSITY_G_PER_KWH
    probe_width: bool = True
    quick_compile: bool = True
    width_start: str = "auto"
    width: int | None = None
    memory_limit_bytes: int | None = None
    window_seconds: float = 2.0
    optuna_seconds: float = 30.0
    steps_per_window: int | None = None
    max_energy_joules: float | None = None
    max_wall_seconds: float | None = None
    target_score: float | None = None
    rounds: int = 1
    extensions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    warm_start: str | None = None
    dataset_fingerprint: str | None = None
    imports: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_type(f.name, f.type, getattr(self, f.name))
        for name, low, closed in _RANGES:
            value = getattr(self, name)
            if value is not None and (value < low if closed else value <= low):
                raise ValueError(
                    f"{name} must be {'>=' if closed else '>'} {low:g} (got {value!r}): {_RANGE_HINTS.get(name, 'fix the value')}"
                )
        get_scheduler(self.mode)  # one line naming the known schedulers
        get_searcher(self.sampler)  # one line naming the known searchers
        check_rounds(self)  # (an extension's form, before the size counts it)
        self._check_size()
        rung_budgets(self.min_budget, self.max_budget, self.eta)  # validates
        if self.rungs is not None:
            r = [float(x) for x in self.rungs]
            if (
                not r
                or r[0] != self.min_budget
                or r[-1] != self.max_budget
                or any(b <= a for a, b in itertools.pairwise(r))
            ):
                raise ValueError(
                    f"rungs must increase from min_budget to max_budget (got {self.rungs}, {self.min_budget}..{self.max_budget})"
                )
        if self.keep_rule not in KEEP_RULES:
            raise ValueError(f"keep_rule: unknown {self.keep_rule!r}; known: {KEEP_RULES}")
        if min(self.noise_z, self.final_z, self.energy_z, self.explore_z, self.rung_z or 0.0, self.energy_noise) < 0:
            raise ValueError(
                f"noise_z, final_z, energy_z, explore_z, rung_z and energy_noise must be >= 0 (got {self.noise_z}, {self.final_z}, {self.energy_z}, {self.explore_z}, {self.rung_z}, {self.energy_noise})"
            )
        ran = self.effective()  # what the scheduler runs: plain SH explores nothing, whatever is written
        if not 0 <= ran.explore_budget < ran.min_budget:
            raise ValueError(
                f"explore_budget must be in [0, min_budget) (got {self.explore_budget}, min_budget {self.min_budget})"
            )
        if self.objective == "cost_to_target" and self.target_score is None:
            raise ValueError(
                "objective cost_to_target needs a target score: add --set target_score=0.95 (the validation score to reach)"
            )
        if not 0 < self.explore_keep <= 1:
            raise ValueError(
                f"explore_keep must be in (0, 1] (got {self.explore_keep}): the fraction of each cohort exploration keeps, e.g. --set explore_keep=0.5 (1 keeps all)"
            )
        steps_for(1, self.budget_unit, 1, 1)  # validates the unit
        for name in ("probe_width", "quick_compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false (got {getattr(self, name)!r}), e.g. --set {name}=false")

    def configuration_count(self) -> int | None:
        """How many configurations the spec makes (its grid's size, or ``num_samples``), computed
        without making them (``None``: a space not of :meth:`SearchSpace.to_json`'s form)."""
        sampler = self.effective().sampler  # (Hyperband samples a grid's space)
        if get_searcher(sampler).fixed_size:
            return SearchSpace.grid_size_of(self.space) if sampler == "grid" else None
        return sum(round_sizes(self))

    def _check_size(self) -> None:
        count = self.configuration_count()
        if count is not None and count > self.max_configurations:
            what = "the grid of its space" if self.effective().sampler == "grid" else "num_samples, e.g. --samples"
            raise ValueError(
                f"the study would make {count:,} configurations ({what}), above the limit of {self.max_configurations:,}: search fewer, or raise the limit with --set max_configurations={count}"
            )

    def effective(self) -> StudySpec:
        """The spec as its scheduler (``mode``) runs it: plain successive halving explores nothing
        and ranks on the score, whatever ``explore_budget`` and ``objective`` say
        (:meth:`sm2jax.schedule.Scheduler.effective`); the spec itself keeps what was written."""
        return get_scheduler(self.mode).effective(self)

    def phases(self) -> list[tuple[str, float]]:
        """The study's phases, ``(name, cumulative budget)``, as its scheduler (``mode``) names them."""
        return get_scheduler(self.mode).phases(self)

    def configs(self, history: Sequence[Any] = ()) -> list[Config]:
        """The configurations the spec's searcher (``sampler``) proposes for a new study's first
        round (``history``: a warm start's results, :func:`sm2jax.proposals.warm_observations`; a
        study keeps what was proposed: :func:`sm2jax.proposals.study_proposals`; later rounds:
        :mod:`sm2jax.rounds`)."""
        return propose(self, 1, history, first_id=0)

    def trial_configs(self) -> list[Config]:
        """The configurations, then their seed replicates (:meth:`replicate_of`), in trial-id order."""
        return self.proposals()[0]

    def replicate_of(self) -> dict[int, int]:
        """Replicate trial id -> the trial id of the configuration it replicates."""
        return self.proposals()[1]

    def proposals(
        self, history: Sequence[Any] = (), configs: list[Config] | None = None
    ) -> tuple[list[Config], dict[int, int]]:
        """:meth:`trial_configs` and :meth:`replicate_of` from one proposal of the searcher (or of
        the first round's ``configs`` given)."""
        configs = self.configs(history) if configs is None else configs
        twins = self.effective()._replicates(configs)
        return configs + [twin for twin, _ in twins], {twin.trial_id: original for twin, original in twins}

    def _replicates(self, configs: list[Config]) -> list[tuple[Config, int]]:
        """``replicates`` evenly spaced configurations of each cohort, again with other keys (another
        seed and trial id; the same hyperparameters otherwise), numbered after the configurations."""
        from sm2jax.cohort import group_into_cohorts

        if not self.replicates or not self.explore_budget:
            return []
        out, next_id = [], max(c.trial_id for c in configs) + 1
        for cohort in group_into_cohorts(configs):
            k, r = cohort.size, min(self.replicates, cohort.size // 4)  # at most one per four configurations
            for i in sorted({int((j + 0.5) * k / r) for j in range(r)}):
                original = cohort.configs[i]
                values = {**original.values, "seed": (original["seed"] + REPLICATE_SEED_OFFSET) % 2**31}
                out.append((make_config(next_id, **values), original.trial_id))
                next_id += 1
        return out

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_spec(directory: str | os.PathLike) -> StudySpec:
    """The :class:`StudySpec` stored in ``directory/spec.json``, with one-line errors for a missing
    study, a Hyperband run, or a spec this version does not know."""
    folder = StudyDir(directory)
    blob = folder.spec_blob()
    if blob is None:
        raise FileNotFoundError(
            f"no study in {directory} (spec.json missing): start one with `sm2jax run --dir {directory}`"
        )
    if "hyperband" in blob:
        raise ValueError(
            f"{directory} holds a Hyperband run, not a single study: use run_hyperband (or `sm2jax resume {directory}`)"
        )
    unknown = sorted(set(blob) - {f.name for f in dataclasses.fields(StudySpec)})
    if unknown:
        raise ValueError(f"{folder.spec_path}: unknown field(s) {', '.join(unknown)}; remove them or upgrade sm2jax")
    folder.check_seal(blob, current_form)  # an edited spec.json is refused, never re-interpreted
    return StudySpec(**_upgraded(blob))


def current_form(blob: dict[str, Any]) -> dict[str, Any]:
    """A stored spec in this version's form (fields added since take their defaults, except that a
    study from before seed replicates has none), as its scheduler runs it (:meth:`StudySpec.effective`:
    a plain-SH spec written with an exploration budget, and one from the version that rewrote it to
    0, are the same study)."""
    return StudySpec(**_upgraded(blob)).effective().to_json()


def _upgraded(blob: dict[str, Any]) -> dict[str, Any]:
    """A spec from before seed replicates (and exploration's halving) decides as it did then."""
    return {"replicates": 0, "explore_keep": 1.0, **blob}


def bind(spec: StudySpec, dataset: ArrayDataset | None, directory: str | os.PathLike) -> StudySpec:
    """``spec`` ready to run in ``directory``: the modules it needs imported, an in-memory
    ``dataset`` recorded by name and fingerprint (or refused when it differs from the one the study
    ran on), and the modules that registered what it uses added to ``imports``."""
    import_modules(spec.imports)
    if dataset is not None:
        fingerprint = dataset.fingerprint()
        if spec.dataset_fingerprint not in (None, fingerprint) and spec.dataset == dataset.name:
            raise ValueError(
                f"the data set passed differs from the one this study ran on ({dataset.name!r}, fingerprint {fingerprint} != {spec.dataset_fingerprint}): pass the same arrays, or start a new study in another directory"
            )
        spec = dataclasses.replace(spec, dataset=dataset.name, dataset_fingerprint=fingerprint)
    elif spec.dataset_fingerprint is not None:
        raise ValueError(
            f"this study ran on the in-memory data set {spec.dataset!r} (fingerprint {spec.dataset_fingerprint}): pass it again with Study({str(directory)!r}, dataset=...) to resume"
        )
    elif spec.dataset not in BUILTIN_DATASETS and registered_dataset(spec.dataset) is None:
        raise ValueError(
            f"unknown data set {spec.dataset!r}: not built in ({', '.join(BUILTIN_DATASETS)}) and not registered in this process; call sm2jax.register_dataset({spec.dataset!r}, loader) first (or name its module with --import)"
        )
    if dataset is None:
        check_dataset_options(spec.dataset, spec.dataset_options)
    spec = dataclasses.replace(spec, imports=sorted({*spec.imports, *registering_modules(spec, dataset)}))
    return spec


def import_modules(names: list[str]) -> None:
    """Imports the modules a study needs (those that registered its models, data set or task)."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ValueError(
                f"this study needs module {name!r} (it registers a model, data set or task) but it cannot be imported ({err}): put it on PYTHONPATH, or register them again before resuming"
            ) from None


def registering_modules(spec: StudySpec, dataset: ArrayDataset | None) -> set[str]:
    """Importable modules that registered what ``spec`` uses (``__main__`` -- a notebook or a
    script -- is not importable from another process and is left out)."""
    from sm2jax.models import MODELS
    from sm2jax.vocabulary import registering_modules as vocabulary_modules

    found = []
    space = SearchSpace.from_json(spec.space)  # what any searcher may propose, without proposing

    def choices(name: str) -> list[Any]:
        domain = space.domains.get(name)
        return domain.grid() if domain is not None else [make_config(0)[name]]

    for model in choices("model"):
        name = model if isinstance(model, str) else model["name"]
        if name not in MODELS.builtin() and name in MODELS:
            found.append(MODELS[name].build)
    if dataset is None and registered_dataset(spec.dataset) is not None:
        found.append(registered_dataset(spec.dataset))
    task = spec.task or (dataset.task if dataset is not None else None)
    if task is not None and task not in TASKS.builtin():
        found.append(get_task(task).loss)
    modules = {getattr(f, "__module__", None) for f in found}
    modules.add(type(get_searcher(spec.sampler)).__module__)  # a searcher or scheduler registered outside sm2jax
    modules.add(type(get_scheduler(spec.mode)).__module__)
    modules |= vocabulary_modules(set(choices("optimizer")), set(spec.space))
    if task is not None:
        modules |= vocabulary_modules((), get_task(task).hyperparameters)
    return {m for m in modules if m and m not in ("__main__", "__mp_main__") and not m.startswith("sm2jax.")}
