"""A study: SM2 (or a baseline) over a search space, in a directory that survives kills.

Directory layout::

    spec.json              what to run (written once)
    hardware.json          devices, power limits, idle baseline, energy method
    ledger.jsonl           energy per window and per trial (append-only, fsync-ed)
    progress/phase-P.json  the study's state after phase P (atomic rename)
    checkpoints/P/         Orbax: every surviving cohort after phase P, survivors already gathered
    results.json           the outcome

Phases are ``explore`` (if enabled) then ``rung-1 .. rung-n``. A phase trains every surviving
cohort up to the phase's cumulative budget, evaluates, decides, gathers survivors, checkpoints them
and only then writes ``progress/phase-P.json``. ``resume`` restarts from the newest phase whose
progress and checkpoint are both readable (falling back to an older one with a warning), so a kill at
any moment loses at most the phase in flight, and -- training being deterministic given seeds and
widths, which are stored -- reaches the same decisions.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from sm2jax.checkpoint import CheckpointError, StudyCheckpoints
from sm2jax.cohort import CohortSpec, group_into_cohorts
from sm2jax.compile_cache import count_compiles, enable_compile_cache
from sm2jax.data import BUILTIN_DATASETS, ArrayDataset, device_put_dataset, load_dataset, registered_dataset
from sm2jax.distributed import DistributedMeter, barrier, is_primary
from sm2jax.energy import (
    EnergyLedger,
    EnergyMonitor,
    IdleBaseline,
    add_known,
    hardware_profile,
    make_meter,
    measure_idle,
    summarize,
    trial_totals,
)
from sm2jax.energy.meters import jax_gpus
from sm2jax.placement import Placement
from sm2jax.runner import CohortRunner, Metering, WidthPolicy
from sm2jax.scheduler import (
    KEEP_RULES,
    Candidate,
    exploration_filter,
    finalist_front,
    halve,
    resolve_objective,
    rung_budgets,
    steps_for,
)
from sm2jax.space import Config, SearchSpace
from sm2jax.tasks import BUILTIN_TASKS, get_task
from sm2jax.trainer import CohortTrainer, memory_limit_bytes

log = logging.getLogger(__name__)

MODES = ("sm2", "sh", "full")


@dataclasses.dataclass
class StudySpec:
    """Everything that defines a study (JSON-serialisable).

    Attributes:
      space: a :meth:`SearchSpace.to_json` mapping.
      sampler: ``grid`` or ``random`` (``num_samples`` configurations seeded by ``seed``).
      dataset: name for :func:`sm2jax.data.load_dataset` (built in or registered with
        :func:`sm2jax.register_dataset`); ``dataset_options`` its keyword arguments. With
        ``Study(..., dataset=ds)`` it is set to ``ds.name``.
      dataset_fingerprint: set by ``Study(..., dataset=ds)``: the in-memory data set's
        :meth:`~sm2jax.data.ArrayDataset.fingerprint`; resuming needs the same arrays again.
      imports: modules imported before the study runs or resumes. A study adds the importable
        modules that registered the models, data set and task it uses, so ``sm2jax resume`` finds
        them (``sm2jax run --import MODULE`` adds one by hand).
      max_train_examples, max_val_examples: optional truncation (quick runs, tests).
      mode: ``sm2`` (exploration + energy-aware halving), ``sh`` (plain successive halving, no
        exploration, objective ``performance``) or ``full`` (every configuration to the full budget).
      budget_unit: ``steps``, ``samples`` or ``epochs``; budgets are cumulative per configuration.
      explore_budget: SM2's exploratory pretraining budget (0 disables); must be below ``min_budget``.
      min_budget, max_budget, eta: successive-halving rungs ``min_budget * eta**i`` up to ``max_budget``.
      rungs: explicit cumulative rung budgets instead (first ``min_budget``, last ``max_budget``), e.g.
        Hyperband's integral budgets.
      keep_rule: ``ceil`` keeps ``ceil(n / eta)`` per rung (successive halving), ``floor`` keeps
        ``floor(n / eta)`` (Hyperband's inner loop, Li et al. 2018); at least one either way.
      objective: ``sm2`` (epsilon-constraint: energy decides only among scores tied within the noise,
        see :mod:`sm2jax.scheduler`), ``performance``, ``blend`` or ``pareto`` (a callable via
        :class:`Study` directly).
      noise_z: two scores are tied unless they differ by more than ``noise_z`` standard errors of
        their difference (rungs and the final selection).
      final_z: the tie width at the final rung, where energy is already spent: the selection is by
        score, and only scores within ``final_z`` standard errors go to the one cheaper to train (at
        one standard error the better-scoring configuration is truly better with probability ~0.84:
        too likely to give up for energy that is sunk).
      energy_z: likewise for two energies, whose noise has heavier tails.
      explore_z: the clear margin, in standard errors, exploration needs to drop a configuration.
      energy_noise: relative uncertainty of a cohort's energy rate (default 20%: identical runs'
        windows spread 21% median).
      alpha, beta: weights of the ``blend`` objective.
      plateau_tolerance: a score gain at or below this over a budget flags the candidate's learning
        rate as plateaued (recorded with its decision; the ``blend`` objective's G term penalises it).
      energy_method: ``auto`` or a method of :data:`sm2jax.energy.METHODS`.
      watts_per_core: the ``estimated`` method's per-core power.
      idle_seconds: idle-baseline measurement before the study (0 skips it: net energy unavailable).
      carbon_intensity: gCO2e per kWh.
      probe_width: measure the fastest vmap width per cohort when it pays (see :mod:`sm2jax.runner`).
      quick_compile: on a CPU backend, start each cohort with a quick-compiling training program and
        compile the optimised one only when the cohort's remaining training pays for it (see
        :mod:`sm2jax.runner`); ``False`` always uses the optimised program.
      width_start: ``auto`` (width 1 on a CPU backend, the widest that fits on accelerators),
        ``narrowest`` or ``widest``; ``width`` caps the width.
      memory_limit_bytes: device memory cap for the hardware filter (default: the device's).
      window_seconds: target length of an energy window (NVML counters need >= ~1 s).
      steps_per_window: fixed steps per energy window (overrides ``window_seconds``).
    """

    space: dict[str, Any]
    sampler: str = "grid"
    num_samples: int = 16
    seed: int = 0
    dataset: str = "digits"
    dataset_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_train_examples: int | None = None
    max_val_examples: int | None = None
    mode: str = "sm2"
    budget_unit: str = "epochs"
    explore_budget: float = 0.25
    min_budget: float = 1.0
    max_budget: float = 9.0
    eta: int = 3
    rungs: list[float] | None = None
    keep_rule: str = "ceil"
    objective: str = "sm2"
    noise_z: float = 1.0
    final_z: float = 0.5
    energy_z: float = 2.0
    explore_z: float = 2.0
    energy_noise: float = 0.2
    alpha: float = 0.5
    beta: float = 0.3
    plateau_tolerance: float = 0.005
    energy_method: str = "auto"
    watts_per_core: float = 10.0
    idle_seconds: float = 2.0
    carbon_intensity: float = 475.0
    probe_width: bool = True
    quick_compile: bool = True
    width_start: str = "auto"
    width: int | None = None
    memory_limit_bytes: int | None = None
    window_seconds: float = 2.0
    steps_per_window: int | None = None
    dataset_fingerprint: str | None = None
    imports: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: unknown {self.mode!r}; known: {MODES}")
        if self.sampler not in ("grid", "random"):
            raise ValueError(f"sampler: unknown {self.sampler!r}; known: grid, random")
        if self.mode == "sh":
            self.explore_budget, self.objective = 0.0, "performance"
        if self.mode == "full":
            self.explore_budget, self.objective, self.min_budget = 0.0, "performance", self.max_budget
        rung_budgets(self.min_budget, self.max_budget, self.eta)  # validates
        if self.rungs is not None:
            r = [float(x) for x in self.rungs]
            if not r or r[0] != self.min_budget or r[-1] != self.max_budget or any(b <= a for a, b in zip(r, r[1:])):
                raise ValueError(
                    f"rungs must increase from min_budget to max_budget (got {self.rungs}, {self.min_budget}..{self.max_budget})"
                )
        if self.keep_rule not in KEEP_RULES:
            raise ValueError(f"keep_rule: unknown {self.keep_rule!r}; known: {KEEP_RULES}")
        if min(self.noise_z, self.final_z, self.energy_z, self.explore_z, self.energy_noise) < 0:
            raise ValueError(
                f"noise_z, final_z, energy_z, explore_z and energy_noise must be >= 0 (got {self.noise_z}, {self.final_z}, {self.energy_z}, {self.explore_z}, {self.energy_noise})"
            )
        if not 0 <= self.explore_budget < self.min_budget:
            raise ValueError(
                f"explore_budget must be in [0, min_budget) (got {self.explore_budget}, min_budget {self.min_budget})"
            )
        steps_for(1, self.budget_unit, 1, 1)  # validates the unit
        for name in ("probe_width", "quick_compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false (got {getattr(self, name)!r}), e.g. --set {name}=false")

    def phases(self) -> list[tuple[str, float]]:
        out = [("explore", self.explore_budget)] if self.explore_budget > 0 else []
        rungs = self.rungs if self.rungs is not None else rung_budgets(self.min_budget, self.max_budget, self.eta)
        return out + [(f"rung-{i + 1}", float(r)) for i, r in enumerate(rungs)]

    def configs(self) -> list[Config]:
        space = SearchSpace.from_json(self.space)
        return space.grid() if self.sampler == "grid" else space.sample(self.num_samples, self.seed)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_spec(directory: str | os.PathLike) -> StudySpec:
    """The :class:`StudySpec` stored in ``directory/spec.json``, with one-line errors for a missing
    study, a Hyperband run, or a spec this version does not know."""
    path = os.path.join(os.fspath(directory), "spec.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no study in {directory} (spec.json missing): start one with `sm2jax run --dir {directory}`"
        )
    with open(path) as f:
        blob = json.load(f)
    if "hyperband" in blob:
        raise ValueError(
            f"{directory} holds a Hyperband run, not a single study: use run_hyperband (or `sm2jax resume {directory}`)"
        )
    unknown = sorted(set(blob) - {f.name for f in dataclasses.fields(StudySpec)})
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}; remove them or upgrade sm2jax")
    return StudySpec(**blob)


def has_run(directory: str | os.PathLike) -> bool:
    """Whether the study (or Hyperband run) in ``directory`` has measured or trained anything."""
    d = os.fspath(directory)
    if not os.path.isdir(d):
        return False
    names = os.listdir(d)
    phases = os.listdir(os.path.join(d, "progress")) if "progress" in names else []
    return bool(phases) or any(
        n in ("ledger.jsonl", "results.json", "checkpoints") or n.startswith("bracket-") for n in names
    )


def claim_directory(directory: str | os.PathLike, spec_blob: dict[str, Any]) -> None:
    """Writes ``spec_blob`` as ``directory/spec.json`` unless the directory holds a different study
    that has already run (then raises; no study data is ever overwritten). A spec whose study never
    ran -- a first start that failed on bad input -- is replaced by the corrected one."""
    path = os.path.join(os.fspath(directory), "spec.json")
    wanted = json.loads(json.dumps(spec_blob, default=_json_default))
    held = None
    if os.path.exists(path):
        with open(path) as f:
            held = json.load(f)
    if held is not None and "hyperband" not in held:
        try:  # a spec written by an earlier version lacks fields added since: their defaults apply
            held = json.loads(json.dumps(StudySpec(**held).to_json(), default=_json_default))
        except (TypeError, ValueError):
            pass  # unknown fields or values: compared as they are (and refused below if it has run)
    if held == wanted:
        return
    if held is not None and has_run(directory):
        kind = "a Hyperband run" if "hyperband" in held else "a study"
        differ = sorted(k for k in {*held, *wanted} if held.get(k) != wanted.get(k))
        raise ValueError(
            f"{directory} already holds {kind} with a different spec (differs in: {', '.join(differ)}); resume it (`sm2jax resume {directory}`) or choose another directory"
        )
    os.makedirs(os.path.join(os.fspath(directory), "progress"), exist_ok=True)
    _atomic_write_json(path, spec_blob)


def _progress_bar_class():
    """Jupyter's widget bars where ``ipywidgets`` is installed, else text bars (which render in a
    notebook too; ``tqdm.auto`` would warn "IProgress not found" there)."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm


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
    from sm2jax.models import BUILTIN_MODELS, MODEL_REGISTRY

    found = []
    for c in spec.configs():
        name = c["model"]["name"]
        if name not in BUILTIN_MODELS and name in MODEL_REGISTRY:
            found.append(MODEL_REGISTRY[name])
    if dataset is None and registered_dataset(spec.dataset) is not None:
        found.append(registered_dataset(spec.dataset))
    task = dataset.task if dataset is not None else None
    if task is not None and task not in BUILTIN_TASKS:
        found.append(get_task(task).loss)
    modules = {getattr(f, "__module__", None) for f in found}
    return {m for m in modules if m and m not in ("__main__", "__mp_main__") and not m.startswith("sm2jax.")}


def _atomic_write_json(path: str, blob: Any) -> None:
    """Writes ``blob`` to ``path`` atomically (a rename commits it); only process 0 of a
    multi-process study writes (see :mod:`sm2jax.distributed`)."""
    if not is_primary():
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(blob, f, indent=1, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


@dataclasses.dataclass
class StudyState:
    """What a study knows after a phase; ``progress/phase-P.json`` holds it, resume reads it back.

    Attributes:
      phase: the last finished phase (-1 before the first).
      infeasible: trial id -> why it cannot run here (batch larger than the data, does not fit).
      hardware: cohort name -> ``{"width", "notes", "choices"}``, every width decision with its reason.
      runners: cohort name -> what its runner needs to continue (:meth:`CohortRunner.to_json`).
      alive: cohort name -> trial ids of its surviving rows, in row order.
      trials: trial id -> ``{"score", "score_se", "metric", "energy_spent", "samples_spent", "history"}``.
      cohort_energy: cohort name -> one ``{"phase", "joules", "samples"}`` per phase (its trials'
        training energy and samples), from which decisions take a smoothed rate and its spread.
      decisions: every decision record, in order.
      selected: the selected trial id once the last phase is done.
      finalists: the last rung's candidates with their score, energy to train and whether they are
        on the score/energy Pareto front (shown apart from the selection).
      completed_by: phase name -> the attempt that completed it (an earlier attempt's windows of
        that phase are interrupted work, reported on their own line).
      test: the selected configuration's held-out test ``{"metric", "score", "score_se"}`` (``None``
        without a test split).
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

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, blob: dict[str, Any]) -> StudyState:
        return cls(**blob)


class Study:
    """Runs, resumes and reports a study in ``directory``.

    The study is a loop over phases; each live cohort is a :class:`sm2jax.runner.CohortRunner`,
    which owns its rows, width and compiled programs. JAX's persistent compilation cache is turned
    on when a study runs (see :mod:`sm2jax.compile_cache`; ``SM2JAX_COMPILE_CACHE=off`` disables it).

    Args:
      directory: the study folder (created).
      spec: required for a new study; omitted to resume an existing one.
      objective: optional callable objective overriding ``spec.objective`` (not persisted: pass it
        again on resume).
      nvml: optional NVML module (a test double in tests).
      gpus: the GPUs to meter (``"all"`` or ``[{"pci_bus_id" | "uuid" | "index": ...}]``); default:
        those JAX computes on, found by PCI bus id (:func:`sm2jax.energy.meters.jax_gpus`).
      progress: show a progress bar per phase.
      dataset: an in-memory data set (instead of ``spec.dataset``'s loader).
      devices: the devices of the ``trials`` mesh axis: a count (the first ``n`` of
        ``jax.devices()``), a list, or ``None`` for all of them (every process's, in a multi-process
        study). Not part of the spec: a study checkpointed on N devices resumes on M.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        spec: StudySpec | None = None,
        *,
        objective: Callable | None = None,
        nvml: Any = None,
        gpus: Any = None,
        progress: bool = True,
        dataset: ArrayDataset | None = None,
        devices: int | Sequence[Any] | None = None,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        if spec is None:
            spec = read_spec(self.directory)
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
        spec = dataclasses.replace(spec, imports=sorted({*spec.imports, *registering_modules(spec, dataset)}))
        self.spec = spec
        self.objective = resolve_objective(
            objective or spec.objective, z=spec.noise_z, energy_z=spec.energy_z, alpha=spec.alpha, beta=spec.beta
        )
        # The final selection: energy spent is sunk, so only near-ties go to the cheaper configuration.
        self.final_objective = resolve_objective(
            objective or spec.objective, z=spec.final_z, energy_z=spec.energy_z, alpha=spec.alpha, beta=spec.beta
        )
        self.progress_bar = progress and is_primary()
        self._nvml = nvml
        self._gpus = gpus
        self._dataset = dataset
        self._on_device = None
        self.configs = {c.trial_id: c for c in spec.configs()}  # a bad space fails here, before anything is written
        if not self.configs:
            raise ValueError("the search space produced no configuration")
        claim_directory(self.directory, spec.to_json())
        barrier("sm2jax-claim")  # spec.json is written (by process 0) before any process reads on
        self.placement = Placement.create(devices)
        # Several processes must take identical decisions: a width chosen from a process's own
        # clock (probe, narrowing) could differ between them, so there the width stays as started.
        single = jax.process_count() == 1
        self.policy = WidthPolicy(
            max_width=spec.width,
            memory_limit=spec.memory_limit_bytes or memory_limit_bytes(),
            probe=spec.probe_width and single,
            narrow=single,
            start=spec.width_start,
            quick=spec.quick_compile and single,
        )

    # ------------------------------------------------------------------------------- progress io

    def _progress_path(self, phase: int) -> str:
        return os.path.join(self.directory, "progress", f"phase-{phase}.json")

    def _saved_phases(self) -> list[int]:
        names = os.listdir(os.path.join(self.directory, "progress"))
        return sorted(int(n[6:-5]) for n in names if n.startswith("phase-") and n.endswith(".json"))

    def _load_progress(self, phase: int) -> StudyState:
        with open(self._progress_path(phase)) as f:
            return StudyState.from_json(json.load(f))

    # ------------------------------------------------------------------------------------- setup

    def _load_data(self) -> ArrayDataset:
        if self._dataset is None:
            ds = load_dataset(self.spec.dataset, **self.spec.dataset_options)
            if self.spec.max_train_examples or self.spec.max_val_examples:
                ds = ds.subset(self.spec.max_train_examples, self.spec.max_val_examples)
            self._dataset = ds
        return self._dataset

    def _device_data(self) -> dict[str, Any]:
        """The data set on the devices (replicated on each), once per study: every cohort reads the
        same arrays."""
        if self._on_device is None:
            self._on_device = device_put_dataset(self._load_data(), placement=self.placement)
        return self._on_device

    def _steps(self, budget: float, batch_size: int) -> int:
        """Training steps that a cumulative ``budget`` means at ``batch_size``."""
        return steps_for(budget, self.spec.budget_unit, batch_size, self._load_data().num_train // batch_size)

    def _trainer(self, cohort: CohortSpec) -> CohortTrainer:
        return CohortTrainer(
            cohort,
            self._load_data(),
            schedule_steps=self._steps(self.spec.max_budget, cohort.signature.batch_size),
            device_data=self._device_data(),
            placement=self.placement,
        )

    def _planned_trial_steps(self, runner: CohortRunner, from_phase: int) -> float:
        """Trial-steps the study still plans for ``runner`` from ``from_phase`` on, if successive
        halving keeps ``1/eta`` of it per rung (an estimate for the width policy, not a promise)."""
        return self._plan(runner.k, runner.spec.signature.batch_size, int(runner.field("step").max()), from_phase)

    def _plan(self, k: int, bs: int, done: int, from_phase: int) -> float:
        """Trial-steps of ``k`` trials at batch size ``bs``, each ``done`` steps in, from ``from_phase`` on."""
        alive, total = float(k), 0.0
        phases = self.spec.phases()
        for i in range(from_phase, len(phases)):
            name, budget = phases[i]
            steps = self._steps(budget, bs)
            total += alive * max(steps - done, 0)
            done = max(done, steps)
            if name != "explore":
                alive = max(1.0, alive / self.spec.eta)
        return total

    def _setup_energy(self, fresh: bool) -> None:
        # Default: this process's GPUs on the trials axis (none on a CPU backend).
        gpus = (
            self._gpus
            if self._gpus is not None
            else jax_gpus([d for d in self.placement.devices if d.process_index == jax.process_index()])
        )
        self.meter = make_meter(
            self.spec.energy_method,
            nvml=self._nvml,
            watts_per_core=self.spec.watts_per_core,
            gpus=gpus or None,
            backend="gpu" if self._gpus else None,
        )
        if jax.process_count() > 1:
            self.meter = DistributedMeter(self.meter)  # every process's devices, in every window
        self.monitor = EnergyMonitor(self.meter)
        hw_path = os.path.join(self.directory, "hardware.json")
        measure = fresh or not os.path.exists(hw_path)
        barrier("sm2jax-setup")  # every process has read the folder before process 0 writes to it
        if measure:
            if self.spec.idle_seconds > 0:
                idle = measure_idle(self.monitor, self.spec.idle_seconds)
            else:
                idle = IdleBaseline(None, 0.0, self.meter.method, "idle baseline not measured (idle_seconds = 0)")
            hw = {
                "profile": hardware_profile(self._nvml),
                "energy_method": self.meter.method,
                "energy_note": self.meter.reason,
                "metered_devices": self.meter.devices,
                "resolution_s": self.meter.resolution_s,
                "idle": dataclasses.asdict(idle),
                "host_method": getattr(getattr(self.meter, "host", None), "method", None),
            }
            _atomic_write_json(hw_path, hw)
            barrier("sm2jax-hardware")
        with open(hw_path) as f:
            hw = json.load(f)
        self.hardware = hw
        self.idle = IdleBaseline(**hw["idle"])
        self.ledger = EnergyLedger(
            os.path.join(self.directory, "ledger.jsonl"),
            idle=self.idle,
            intensity_g_per_kwh=self.spec.carbon_intensity,
            write=is_primary(),
        )

    def _tally(self, window: dict[str, Any]) -> None:
        """Keeps the study's running energy total (for the progress bar) without rereading the ledger."""
        self._methods.add(window["method"])
        self._total_joules = add_known(self._total_joules, window["joules"])

    # ------------------------------------------------------------------------------ hardware filter

    def _create_runner(self, cohort_spec: CohortSpec, progress: StudyState) -> CohortRunner | None:
        """Builds a cohort's runner at the widest width that fits; records infeasible trials
        (a batch larger than the data, no width fits in memory) instead of raising."""
        ids = [c.trial_id for c in cohort_spec.configs]
        try:
            trainer = self._trainer(cohort_spec)
        except ValueError as err:  # e.g. a batch larger than the data set
            for i in ids:
                progress.infeasible[str(i)] = str(err)
            return None
        runner, notes = CohortRunner.create(
            cohort_spec,
            trainer,
            self.metering,
            self.policy,
            planned_trial_steps=self._plan(len(ids), cohort_spec.signature.batch_size, 0, 0),
        )
        if runner is None:
            for i in ids:
                progress.infeasible[str(i)] = f"does not fit in device memory even alone: {notes[-1]}"
            progress.hardware[cohort_spec.name] = {"width": None, "notes": notes}
            return None
        progress.hardware[cohort_spec.name] = {"width": runner.width, "notes": notes, "choices": runner.choices}
        return runner

    # ----------------------------------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        """Runs (or resumes) the study to the end; returns and writes ``results.json``."""
        cache_dir = enable_compile_cache()
        with count_compiles() as tally:
            results = self._run()
        results["compilation"] = {**tally.to_json(), "cache_dir": cache_dir}
        _atomic_write_json(os.path.join(self.directory, "results.json"), results)
        return results

    def _run(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        self._load_data()  # fails fast on an unknown data set, before energy set-up
        saved = self._saved_phases()
        fresh = not saved
        self._setup_energy(fresh)
        phases = self.spec.phases()
        # Count attempts from the ledger: a run killed before its first phase completed left no
        # progress file, but its energy is in the ledger and must stay distinguishable.
        earlier = self.ledger.records()
        attempt = max((r.get("attempt", 0) for r in earlier), default=0) + 1
        self._total_joules, self._methods = 0.0, set()
        for r in earlier:
            if r["type"] == "window":
                self._tally(r)
        self.metering = Metering(self.monitor, self.ledger, attempt, on_window=self._tally)

        progress, runners, start_phase = None, [], 0
        for phase in reversed(saved):
            try:
                progress = self._load_progress(phase)
                runners = self._restore(progress, phase)
                start_phase = phase + 1
                break
            except (CheckpointError, OSError, json.JSONDecodeError, KeyError, TypeError) as err:
                warnings.warn(
                    f"phase {phase} cannot be restored ({err}); falling back to the previous phase",
                    RuntimeWarning,
                    stacklevel=3,
                )
                progress, runners = None, []

        checkpoints = StudyCheckpoints(os.path.join(self.directory, "checkpoints"))
        for step in checkpoints.discard_after(start_phase - 1):
            if step not in saved:  # committed, but the run was killed before it recorded the phase
                warnings.warn(
                    f"checkpoint of phase {step} has no progress record (killed between the two); discarded, the phase runs again",
                    RuntimeWarning,
                    stacklevel=3,
                )
        for stale in (p for p in saved if p >= start_phase and is_primary()):
            os.remove(self._progress_path(stale))
        try:
            if progress is None:
                progress = StudyState()
                for cohort_spec in group_into_cohorts(list(self.configs.values())):
                    runner = self._create_runner(cohort_spec, progress)
                    if runner is not None:
                        runners.append(runner)
                for i, reason in progress.infeasible.items():
                    progress.decisions.append(
                        {
                            "phase": "hardware",
                            "trial_id": int(i),
                            "kept": False,
                            "reason_code": "infeasible",
                            "reason": f"infeasible: {reason}",
                        }
                    )
                for r in runners:
                    for t in r.trial_ids:
                        progress.trials[str(t)] = {
                            "score": None,
                            "energy_spent": 0.0,
                            "samples_spent": 0,
                            "history": [],
                        }
            for p in range(start_phase, len(phases)):
                if not runners:
                    break
                runners = self._run_phase(p, runners, progress, checkpoints)
            self.metering.flush()
            results = self._results(progress, time.perf_counter() - t_start)
        finally:
            try:
                self.metering.flush(wait=False)  # after an error: whatever was measured is still written
            finally:
                checkpoints.close()
                self.meter.close()
        return results

    def _run_phase(
        self, p: int, runners: list[CohortRunner], progress: StudyState, checkpoints: StudyCheckpoints
    ) -> list[CohortRunner]:
        tqdm = _progress_bar_class()
        phases = self.spec.phases()
        name, budget = phases[p]
        last = p == len(phases) - 1
        targets = {r.spec.name: self._steps(budget, r.spec.signature.batch_size) for r in runners}
        total_steps = sum(max(targets[r.spec.name] - int(r.field("step").max()), 0) for r in runners)
        bar = tqdm(total=total_steps, desc=f"{name}", unit="step", leave=True, disable=not self.progress_bar)
        candidates: list[Candidate] = []
        samples_before: dict[int, int] = {}
        try:
            for r in runners:
                alive = sum(x.k for x in runners)
                bar.set_postfix_str(
                    f"trials alive {alive}, {self._energy_so_far_text()}, best {self._best_text(progress)}"
                )
                # A configuration's score before exploration is the reference for "has it learned?"; for
                # classification that reference is chance (an untrained classifier scores about chance), so
                # the 54-odd evaluations of untrained models are skipped there.
                base = r.evaluate("explore") if name == "explore" and self._chance is None else None
                samples_before.update({t: progress.trials[str(t)]["samples_spent"] for t in r.trial_ids})
                r.train_to(
                    targets[r.spec.name],
                    name,
                    planned_trial_steps=self._planned_trial_steps(r, p),
                    window_seconds=self.spec.window_seconds,
                    steps_per_window=self.spec.steps_per_window,
                    on_steps=bar.update,
                )
                end = r.evaluate(name)
                step, diverged, diverged_at = r.field("step"), ~r.field("active"), r.field("diverged_at")
                bs = r.spec.signature.batch_size
                total_samples = self._steps(self.spec.max_budget, bs) * bs
                for row, t in enumerate(r.trial_ids):
                    record = progress.trials[str(t)]
                    previous = record["score"] if base is None else float(base.scores[row])
                    samples = int(step[row]) * bs
                    score = float(end.scores[row])
                    candidates.append(
                        Candidate(
                            trial_id=t,
                            cohort=r.spec.name,
                            score=score,
                            gain=score - previous if previous is not None and math.isfinite(score) else None,
                            energy_spent=None,
                            energy_last=None,
                            samples_spent=samples,
                            samples_last=samples - samples_before[t],
                            samples_total=total_samples,
                            diverged=bool(diverged[row]),
                            diverged_at=int(diverged_at[row]),
                            plateau_tolerance=self.spec.plateau_tolerance,
                            score_se=float(end.score_se[row]),
                            start_score=None if base is None else float(base.scores[row]),
                            start_se=0.0 if base is None else float(base.score_se[row]),
                            chance_score=self._chance,
                            energy_noise=self.spec.energy_noise,
                        )
                    )
                    record.update(
                        score=_finite_or_none(score),
                        score_se=float(end.score_se[row]),
                        metric=_finite_or_none(float(end.metrics[row])),
                        samples_spent=samples,
                    )
        finally:
            bar.close()

        # Energy: every window of this phase written (at the meter's resolution), then attributed.
        self.metering.flush()
        ids = [c.trial_id for c in candidates]
        phase_joules = self.metering.trial_joules(name, ids)
        train_joules = self.metering.trial_joules(name, ids, kinds=("train",))
        training: dict[str, dict[str, Any]] = {}
        for c in candidates:
            record = progress.trials[str(c.trial_id)]
            c.energy_last = phase_joules[c.trial_id]
            c.energy_spent = add_known(record["energy_spent"], c.energy_last)
            record["energy_spent"] = c.energy_spent
            record["history"].append(
                {
                    "phase": name,
                    "score": record["score"],
                    "score_se": c.score_se,
                    "samples": c.samples_spent,
                    "energy_spent": c.energy_spent,
                }
            )
            window = training.setdefault(c.cohort, {"phase": name, "joules": 0.0, "samples": 0})
            window["joules"] = add_known(window["joules"], train_joules[c.trial_id])
            window["samples"] += c.samples_last
        self._smooth_energy(training, candidates, progress)
        if name == "explore":
            kept, records = exploration_filter(candidates, z=self.spec.explore_z)
        elif last:
            kept, records = halve(candidates, self.final_objective, eta=len(candidates) + 1)  # keep only the best
        else:
            kept, records = halve(candidates, self.objective, self.spec.eta, self.spec.keep_rule)
        progress.decisions.extend({"phase": name, **rec, "energy_method": self.meter.method} for rec in records)
        if last:
            progress.selected = kept[0] if kept else None
            progress.finalists = finalist_front(candidates)

        kept_set = set(kept)
        survivors = []
        for r in runners:
            ids = [t for t in r.trial_ids if t in kept_set]
            if not ids:
                continue
            if len(ids) < r.k:
                r.select(ids)
                if not last:
                    r.narrow_for_survivors(self._planned_trial_steps(r, p + 1))
            if last and self._load_data().has_test:  # once, for the selected configuration only
                test = r.evaluate(name, split="test")
                progress.test = {
                    "trial_id": ids[0],
                    "metric": _finite_or_none(float(test.metrics[0])),
                    "score": _finite_or_none(float(test.scores[0])),
                    "score_se": float(test.score_se[0]),
                }
            survivors.append(r)
        for r in runners:
            if r.spec.name in progress.hardware:
                progress.hardware[r.spec.name]["choices"] = r.choices
        progress.alive = {r.spec.name: r.trial_ids for r in survivors}
        progress.runners = {r.spec.name: r.to_json() for r in survivors}
        progress.phase = p
        progress.completed_by[name] = self.metering.attempt
        if survivors:  # Orbax refuses an empty tree; a phase with no survivor needs no checkpoint
            checkpoints.save(p, {r.spec.name: r.rows() for r in survivors})
            checkpoints.wait()  # committed before the phase is recorded as done
        _atomic_write_json(self._progress_path(p), progress.to_json())
        return survivors

    @functools.cached_property
    def _chance(self) -> float | None:
        """The score of always guessing the majority class (tasks with class labels), else ``None``."""
        ds = self._load_data()
        if not get_task(ds.task).majority_chance:
            return None
        return float(np.bincount(np.asarray(ds.y_val).ravel()).max() / len(ds.y_val))

    def _smooth_energy(
        self, training: dict[str, dict[str, Any]], candidates: list[Candidate], progress: StudyState
    ) -> None:
        """Adds this phase's training joules and samples per cohort to its history and gives each
        candidate its cohort's rate smoothed over all phases (total training joules / total samples;
        evaluation is a fixed cost per phase, not per sample) with the relative noise
        ``energy_noise``. (The spread of per-phase rates is not used as noise: it mixes real changes
        -- a narrower width for survivors, warm-up -- with noise, and is itself too noisy to decide on.)"""
        for cohort, window in training.items():
            progress.cohort_energy.setdefault(cohort, []).append(window)
        for c in candidates:
            history = [h for h in progress.cohort_energy.get(c.cohort, []) if h["samples"] > 0]
            if not history or any(h["joules"] is None for h in history):
                continue
            c.cohort_rate = sum(h["joules"] for h in history) / sum(h["samples"] for h in history)
            c.energy_noise = self.spec.energy_noise

    def _restore(self, progress: StudyState, phase: int) -> list[CohortRunner]:
        """Rebuilds the runners alive after ``phase`` from their checkpoint (rows gathered on the
        host at save time, re-chunked here at the recorded width)."""
        if not progress.alive:
            return []
        by_name = {c.name: c for c in group_into_cohorts(list(self.configs.values()))}
        trainers, abstract = {}, {}
        for name, ids in progress.alive.items():
            trainers[name] = self._trainer(by_name[name])
            # Each process reads every row onto one of its own devices: rows are re-chunked over
            # this run's devices below, however many the study was checkpointed on.
            local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract[name] = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local), trainers[name].abstract_rows(len(ids))
            )
        checkpoints = StudyCheckpoints(os.path.join(self.directory, "checkpoints"))
        try:
            states = checkpoints.restore(phase, abstract)
        finally:
            checkpoints.close()
        runners = []
        for name, ids in progress.alive.items():
            rows = jax.device_get(states[name])
            if [int(t) for t in np.asarray(rows.trial_id)] != ids:
                raise CheckpointError(f"checkpoint rows of {name} do not match the recorded survivors")
            saved = progress.runners[name]
            same_devices = (
                saved.get("devices", 1) == self.placement.size
            )  # rates measured on other devices do not carry over
            runners.append(
                CohortRunner(
                    by_name[name],
                    trainers[name],
                    rows,
                    saved["width"],
                    self.metering,
                    self.policy,
                    rate_seconds={int(w): s for w, s in saved["step_seconds"].items()} if same_devices else None,
                    probe_pending=saved["probe_pending"],
                    quick=saved.get("quick", False) and self.policy.starts_quick(),
                    choices=progress.hardware.get(name, {}).get("choices", []),
                )
            )
        return runners

    # ------------------------------------------------------------------------------------ results

    def _energy_so_far_text(self) -> str:
        if self._total_joules is None:
            return "energy unavailable"
        return f"{self._total_joules:.1f} J {','.join(sorted(self._methods)) or self.meter.method}"

    @staticmethod
    def _best_text(progress: StudyState) -> str:
        scores = [t["score"] for t in progress.trials.values() if t["score"] is not None]
        return f"{max(scores):.4g}" if scores else "-"

    def _trial_table(self, progress: StudyState, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One row per configuration: its cohort and values, how far it got (the last phase it
        trained in and why it stopped there), its last score, and the energy attributed to it by
        the ledger (finished attempts only; ``None`` when any share was unavailable)."""
        cohort_of = {
            c.trial_id: cohort.name
            for cohort in group_into_cohorts(list(self.configs.values()))
            for c in cohort.configs
        }
        joules, kwh, gco2e = (trial_totals(records, field=f) for f in ("joules", "kwh", "gco2e"))
        last: dict[int, dict[str, Any]] = {}
        for d in progress.decisions:
            last[d["trial_id"]] = d
        finalists = {f["trial_id"] for f in progress.finalists}
        rows = []
        for t, config in sorted(self.configs.items()):
            record = progress.trials.get(str(t), {})
            d = last.get(t)
            if str(t) in progress.infeasible:
                status, phase, reason = "infeasible", None, progress.infeasible[str(t)]
            elif t == progress.selected:
                status, phase, reason = "selected", d["phase"] if d else None, d["reason"] if d else ""
            elif d is None:
                status, phase, reason = "running", None, ""
            elif d["kept"]:
                status, phase, reason = ("finalist" if t in finalists else "running"), d["phase"], d.get("reason", "")
            else:
                status, phase, reason = d.get("reason_code") or "dropped", d["phase"], d.get("reason", "")
            rows.append(
                {
                    "trial_id": t,
                    "cohort": cohort_of[t],
                    "config": config.to_json()["values"],
                    "status": status,
                    "last_phase": phase,
                    "reason": reason,
                    "score": record.get("score"),
                    "score_se": record.get("score_se"),
                    "metric": record.get("metric"),
                    "samples": record.get("samples_spent", 0),
                    "energy_joules": joules.get(t),
                    "kwh": kwh.get(t),
                    "gco2e": gco2e.get(t),
                }
            )
        return rows

    def _results(self, progress: StudyState, wall_seconds: float) -> dict[str, Any]:
        everything = self.ledger.records()
        done = progress.completed_by
        finishers = set(done.values())

        def interrupted(r: dict[str, Any]) -> bool:
            """Work of an attempt that was killed before it recorded the phase (repeated later)."""
            if r["phase"] in done:
                return r.get("attempt") != done[r["phase"]]
            if r["phase"] in ("compile", "probe", "oom-retry"):
                return r.get("attempt") not in finishers
            return True

        records = [r for r in everything if not interrupted(r)]
        lost = [r for r in everything if interrupted(r)]
        by_phase = summarize(records)
        selected = progress.selected
        out: dict[str, Any] = {
            "study": self.directory,
            "mode": self.spec.mode,
            "objective": self.spec.objective,
            "energy_method": self.meter.method,
            "energy_note": self.hardware.get("energy_note", ""),
            "intensity_label": self.ledger.intensity_label,
            "idle": self.hardware["idle"],
            "energy_by_phase": by_phase,
            "interrupted_energy_by_phase": summarize(lost),
            "wall_seconds_this_attempt": wall_seconds,
            "attempts": max((r.get("attempt", 0) for r in everything), default=0),
            "decisions": progress.decisions,
            "finalists": progress.finalists,
            "infeasible": progress.infeasible,
            "hardware": progress.hardware,
            "metric_name": get_task(self._dataset.task).metric_name,
            "num_configs": len(self.configs),
            "placement": {
                "devices": [str(d) for d in self.placement.devices],
                "processes": jax.process_count(),
                "platform": self.placement.devices[0].platform,
            },
        }
        totals = [g["joules"] for g in by_phase.values()]
        out["total_joules"] = None if any(t is None for t in totals) else float(sum(totals))
        lost_totals = [g["joules"] for g in out["interrupted_energy_by_phase"].values()]
        out["interrupted_joules"] = None if any(t is None for t in lost_totals) else float(sum(lost_totals))
        out["trials"] = self._trial_table(progress, records)
        if selected is None:
            out["selected"] = None
            out["note"] = "no configuration survived (all diverged or infeasible)"
            return out
        trial = progress.trials[str(selected)]
        joules = [r["joules"] for r in records if r["type"] == "trial" and r["trial_id"] == selected]
        lost_joules = [r["joules"] for r in lost if r["type"] == "trial" and r["trial_id"] == selected]
        out["selected"] = {
            "trial_id": selected,
            "config": self.configs[selected].to_json()["values"],
            "score": trial["score"],
            "score_se": trial.get("score_se"),
            "metric": trial["metric"],
            "samples": trial["samples_spent"],
            "test": progress.test,
            "energy_to_train_joules": None if any(j is None for j in joules) else float(sum(joules)),
            "interrupted_joules": None if any(j is None for j in lost_joules) else float(sum(lost_joules)),
            "energy_method": self.meter.method,
        }
        return out
