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
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from sm2jax.checkpoint import CheckpointError, StudyCheckpoints
from sm2jax.cohort import CohortSpec, group_into_cohorts
from sm2jax.data import ArrayDataset, device_put_dataset, load_dataset
from sm2jax.energy import EnergyLedger, EnergyMonitor, IdleBaseline, hardware_profile, make_meter, measure_idle, summarize
from sm2jax.scheduler import Candidate, exploration_filter, halve, resolve_objective, rung_budgets, steps_for
from sm2jax.space import Config, SearchSpace
from sm2jax.trainer import TASK_METRIC, CohortTrainer, compiled_memory_bytes, memory_limit_bytes

log = logging.getLogger(__name__)

MODES = ("sm2", "sh", "full")


@dataclasses.dataclass
class StudySpec:
    """Everything that defines a study (JSON-serialisable).

    Attributes:
      space: a :meth:`SearchSpace.to_json` mapping.
      sampler: ``grid`` or ``random`` (``num_samples`` configurations seeded by ``seed``).
      dataset: name for :func:`sm2jax.data.load_dataset`; ``dataset_options`` its keyword arguments.
      max_train_examples, max_val_examples: optional truncation (quick runs, tests).
      mode: ``sm2`` (exploration + energy-aware halving), ``sh`` (plain successive halving, no
        exploration, objective ``performance``) or ``full`` (every configuration to the full budget).
      budget_unit: ``steps``, ``samples`` or ``epochs``; budgets are cumulative per configuration.
      explore_budget: SM2's exploratory pretraining budget (0 disables); must be below ``min_budget``.
      min_budget, max_budget, eta: successive-halving rungs ``min_budget * eta**i`` up to ``max_budget``.
      objective: ``sm2``, ``performance`` or ``pareto`` (a callable via :class:`Study` directly).
      alpha, beta: weights of the ``sm2`` objective.
      score_tolerance, energy_tolerance: exploration dominance margins.
      plateau_tolerance: a score gain at or below this over a budget flags the candidate's learning
        rate as plateaued (recorded with its decision; the G term of the objective penalises it).
      energy_method: ``auto`` or a method of :data:`sm2jax.energy.METHODS`.
      watts_per_core: the ``estimated`` method's per-core power.
      idle_seconds: idle-baseline measurement before the study (0 skips it: net energy unavailable).
      carbon_intensity: gCO2e per kWh.
      probe_width: measure the fastest vmap width per cohort; else ``width`` (or all trials).
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
    objective: str = "sm2"
    alpha: float = 0.5
    beta: float = 0.3
    score_tolerance: float = 0.02
    energy_tolerance: float = 0.1
    plateau_tolerance: float = 0.005
    energy_method: str = "auto"
    watts_per_core: float = 10.0
    idle_seconds: float = 2.0
    carbon_intensity: float = 475.0
    probe_width: bool = True
    width: int | None = None
    memory_limit_bytes: int | None = None
    window_seconds: float = 2.0
    steps_per_window: int | None = None

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
        if not 0 <= self.explore_budget < self.min_budget:
            raise ValueError(f"explore_budget must be in [0, min_budget) (got {self.explore_budget}, min_budget {self.min_budget})")
        steps_for(1, self.budget_unit, 1, 1)  # validates the unit

    def phases(self) -> list[tuple[str, float]]:
        out = [("explore", self.explore_budget)] if self.explore_budget > 0 else []
        return out + [(f"rung-{i + 1}", r) for i, r in enumerate(rung_budgets(self.min_budget, self.max_budget, self.eta))]

    def configs(self) -> list[Config]:
        space = SearchSpace.from_json(self.space)
        return space.grid() if self.sampler == "grid" else space.sample(self.num_samples, self.seed)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _atomic_write_json(path: str, blob: Any) -> None:
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


def _is_oom(err: Exception) -> bool:
    return isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower()


@dataclasses.dataclass
class _Cohort:
    """A live cohort during a run: its trainer, state and the trial ids of its rows."""

    spec: CohortSpec
    trainer: CohortTrainer
    state: Any
    trial_ids: list[int]
    rate: float | None = None  # measured samples/s at the chosen width (sizes energy windows)


class Study:
    """Runs, resumes and reports a study in ``directory``.

    Args:
      directory: the study folder (created).
      spec: required for a new study; omitted to resume an existing one.
      objective: optional callable objective overriding ``spec.objective`` (not persisted: pass it
        again on resume).
      nvml: optional NVML module (a test double in tests).
      progress: show a progress bar per phase.
    """

    def __init__(self, directory: str | os.PathLike, spec: StudySpec | None = None, *, objective: Callable | None = None, nvml: Any = None, progress: bool = True, dataset: ArrayDataset | None = None):
        self.directory = os.path.abspath(os.fspath(directory))
        spec_path = os.path.join(self.directory, "spec.json")
        if spec is None:
            if not os.path.exists(spec_path):
                raise FileNotFoundError(f"no study in {self.directory} (spec.json missing)")
            with open(spec_path) as f:
                spec = StudySpec(**json.load(f))
        else:
            if os.path.exists(spec_path):
                with open(spec_path) as f:
                    if json.load(f) != json.loads(json.dumps(spec.to_json())):
                        raise ValueError(f"{self.directory} already holds a different study; use Study(directory) to resume it")
            os.makedirs(os.path.join(self.directory, "progress"), exist_ok=True)
            _atomic_write_json(spec_path, spec.to_json())
        self.spec = spec
        self.objective = resolve_objective(objective or spec.objective, alpha=spec.alpha, beta=spec.beta)
        self.progress_bar = progress
        self._nvml = nvml
        self._dataset = dataset
        self.configs = {c.trial_id: c for c in spec.configs()}
        if not self.configs:
            raise ValueError("the search space produced no configuration")

    # ------------------------------------------------------------------------------- progress io

    def _progress_path(self, phase: int) -> str:
        return os.path.join(self.directory, "progress", f"phase-{phase}.json")

    def _saved_phases(self) -> list[int]:
        names = os.listdir(os.path.join(self.directory, "progress"))
        return sorted(int(n[6:-5]) for n in names if n.startswith("phase-") and n.endswith(".json"))

    def _load_progress(self, phase: int) -> dict[str, Any]:
        with open(self._progress_path(phase)) as f:
            return json.load(f)

    # ------------------------------------------------------------------------------------- setup

    def _load_data(self) -> ArrayDataset:
        if self._dataset is None:
            ds = load_dataset(self.spec.dataset, **self.spec.dataset_options)
            if self.spec.max_train_examples or self.spec.max_val_examples:
                ds = ds.subset(self.spec.max_train_examples, self.spec.max_val_examples)
            self._dataset = ds
        return self._dataset

    def _device_data(self) -> dict[str, Any]:
        """The data set on the device, once per study: every cohort reads the same arrays."""
        if getattr(self, "_on_device", None) is None:
            self._on_device = device_put_dataset(self._load_data())
        return self._on_device

    def _steps(self, budget: float, batch_size: int) -> int:
        """Training steps that a cumulative ``budget`` means at ``batch_size``."""
        return steps_for(budget, self.spec.budget_unit, batch_size, self._load_data().num_train // batch_size)

    def _schedule_steps(self, cohort: CohortSpec) -> int:
        return self._steps(self.spec.max_budget, cohort.signature.batch_size)

    def _setup_energy(self, fresh: bool) -> None:
        self.meter = make_meter(self.spec.energy_method, nvml=self._nvml, watts_per_core=self.spec.watts_per_core)
        self.monitor = EnergyMonitor(self.meter)
        hw_path = os.path.join(self.directory, "hardware.json")
        if fresh or not os.path.exists(hw_path):
            if self.spec.idle_seconds > 0:
                idle = measure_idle(self.monitor, self.spec.idle_seconds)
            else:
                idle = IdleBaseline(None, 0.0, self.meter.method, "idle baseline not measured (idle_seconds = 0)")
            hw = {"profile": hardware_profile(self._nvml), "energy_method": self.meter.method, "energy_note": self.meter.reason, "idle": dataclasses.asdict(idle)}
            _atomic_write_json(hw_path, hw)
        with open(hw_path) as f:
            hw = json.load(f)
        self.hardware = hw
        self.idle = IdleBaseline(**hw["idle"])
        self.ledger = EnergyLedger(os.path.join(self.directory, "ledger.jsonl"), idle=self.idle, intensity_g_per_kwh=self.spec.carbon_intensity)

    # ------------------------------------------------------------------------------ energy helpers

    def _record(self, reading, cohort: _Cohort, phase: str, work, steps=None) -> dict[int, float | None]:
        """Writes a window to the ledger, attributing it in proportion to ``work`` (per row);
        returns joules per trial id. ``steps``: training steps per row in the window (0 if none)."""
        bs = cohort.spec.signature.batch_size
        steps = np.zeros(len(cohort.trial_ids), np.int64) if steps is None else np.asarray(steps, np.int64)
        recs = self.ledger.record(
            reading, phase=phase, cohort=cohort.spec.name, trial_ids=cohort.trial_ids, work=[float(w) for w in work],
            steps=steps.tolist(), samples=(steps * bs).tolist(), extra={"attempt": self.attempt},
        )
        self._tally(recs[0])
        return {r["trial_id"]: r["joules"] for r in recs[1:]}

    def _tally(self, window: dict[str, Any]) -> None:
        """Keeps the study's running energy total (for the progress bar) without rereading the ledger."""
        self._methods.add(window["method"])
        self._total_joules = None if self._total_joules is None or window["joules"] is None else self._total_joules + window["joules"]

    def _compile(self, cohort: _Cohort) -> None:
        """Compiles the cohort's train and eval programs inside a ``compile`` window."""
        window = self.monitor.begin(f"compile:{cohort.spec.name}", after=cohort.state)
        t0 = time.perf_counter()
        cohort.trainer.compile_train(cohort.state)
        cohort.trainer.compile_eval(cohort.state)
        reading = self.monitor.end(window)
        log.info("compiled %s (width %s) in %.1f s", cohort.spec.name, cohort.trainer.width, time.perf_counter() - t0)
        self._record(reading, cohort, "compile", np.ones(len(cohort.trial_ids)))  # a cohort's program serves all its trials

    # ------------------------------------------------------------------------------ hardware filter

    def _hardware_filter(self, cohort_spec: CohortSpec, ds: ArrayDataset, infeasible: dict[str, str], hardware: dict[str, Any]) -> _Cohort | None:
        """Builds a cohort, finds a vmap width that fits in memory (narrowing as needed) and, if
        enabled, the fastest such width. Records infeasible trials instead of raising."""
        ids = [c.trial_id for c in cohort_spec.configs]
        try:
            trainer = CohortTrainer(cohort_spec, ds, schedule_steps=self._schedule_steps(cohort_spec), device_data=self._device_data())
        except ValueError as err:  # e.g. a batch larger than the data set
            for i in ids:
                infeasible[str(i)] = str(err)
            return None
        cohort = _Cohort(cohort_spec, trainer, trainer.init(), ids)
        limit = self.spec.memory_limit_bytes or memory_limit_bytes()
        k = len(ids)
        notes = []
        window = self.monitor.begin(f"compile:{cohort_spec.name}", after=cohort.state)
        # Try widths from widest down and keep the widest that fits. XLA's need is not monotone in
        # the width (a narrower lax.map stacks a copy of the state), so every candidate is checked.
        width = None
        for w in sorted({min(self.spec.width or k, k) // 2**i for i in range(k.bit_length())} - {0}, reverse=True):
            try:
                need = compiled_memory_bytes(trainer.compile_train(cohort.state, width=w))
            except Exception as err:  # noqa: BLE001
                if not _is_oom(err):
                    raise
                need = math.inf
            if limit is None or need is None or need <= limit:
                width = w
                break
            notes.append(f"width {w} needs {need / 2**20:.1f} MiB > {limit / 2**20:.1f} MiB")
        if width is None:
            self._record(self.monitor.end(window), cohort, "compile", np.ones(k))
            for i in ids:
                infeasible[str(i)] = f"does not fit in device memory even alone: {notes[-1]}"
            hardware[cohort_spec.name] = {"width": None, "notes": notes}
            return None
        trainer.width = width
        candidates = sorted({w for w in (1, 2, 4, 8, 16, 32, 64, width) if w <= width}) if self.spec.probe_width and width > 1 else []
        for w in candidates:  # compiled here so that the probe window below holds no compilation
            trainer.compile_train(cohort.state, width=w)
        self._record(self.monitor.end(window), cohort, "compile", np.ones(k))
        if candidates:
            # The probe trains (and discards) a few steps per width: its energy is its own line.
            window = self.monitor.begin(f"probe:{cohort_spec.name}", after=cohort.state)
            probe = trainer.probe_width(cohort.state, candidates=candidates, steps=3, repeats=3)
            self._record(self.monitor.end(window), cohort, "probe", np.ones(k))
            cohort.rate = probe.samples_per_second[probe.chosen]
            notes.append(f"probe samples/s {probe.samples_per_second}")
        self._compile(cohort)  # evaluation at the chosen width
        hardware[cohort_spec.name] = {"width": trainer.width, "notes": notes}
        if notes:
            log.info("%s: width %d (%s)", cohort_spec.name, trainer.width, "; ".join(notes))
        return cohort

    # ------------------------------------------------------------------------------------ training

    def _train_to(self, cohort: _Cohort, target_steps: int, phase: str, bar) -> dict[int, float | None]:
        """Trains ``cohort`` until its trials reach ``target_steps``, in energy windows; returns
        joules per trial. An out-of-memory error narrows the width and retries the window."""
        energy = {t: 0.0 for t in cohort.trial_ids}
        trainer = cohort.trainer
        while True:
            active = np.asarray(cohort.state.active)
            if not active.any():  # every trial diverged: nothing left to train
                return energy
            done = int(np.asarray(cohort.state.step)[active].max())  # active trials move in lockstep
            remaining = target_steps - done
            if remaining <= 0:
                return energy
            chunk = min(remaining, self._steps_per_window(cohort))
            before = np.asarray(cohort.state.step)
            window = self.monitor.begin(phase, after=cohort.state)
            try:
                new_state, _ = trainer.train(cohort.state, chunk)
                reading = self.monitor.end(window, new_state)
            except Exception as err:  # noqa: BLE001
                if not _is_oom(err) or (trainer.width or 1) <= 1:
                    raise
                # The failed attempt still used energy: keep it, on its own line.
                self._record(self.monitor.end(window), cohort, "oom-retry", np.ones(len(cohort.trial_ids)))
                trainer.width = max(1, (trainer.width or len(cohort.trial_ids)) // 2)
                warnings.warn(f"{cohort.spec.name}: out of memory; retrying at vmap width {trainer.width}", RuntimeWarning, stacklevel=2)
                self._compile(cohort)
                continue
            steps = np.asarray(new_state.step) - before  # 0 for frozen (diverged) trials
            work = steps * (trainer.flops_per_trial_step(new_state) or 1.0)
            for t, j in self._record(reading, cohort, phase, work, steps).items():
                energy[t] = None if j is None or energy[t] is None else energy[t] + j
            cohort.state = new_state
            if bar is not None:
                bar.update(chunk)

    def _steps_per_window(self, cohort: _Cohort) -> int:
        if self.spec.steps_per_window:
            return self.spec.steps_per_window
        rate = cohort.rate
        if rate is None:
            return 10**9  # one window per phase
        samples_per_step = len(cohort.trial_ids) * cohort.spec.signature.batch_size
        return max(1, int(self.spec.window_seconds * rate / samples_per_step))

    def _evaluate(self, cohort: _Cohort, phase: str) -> tuple[np.ndarray, np.ndarray, dict[int, float | None]]:
        window = self.monitor.begin(f"{phase}:eval", after=cohort.state)
        metrics = cohort.trainer.evaluate(cohort.state)
        reading = self.monitor.end(window, metrics)
        joules = self._record(reading, cohort, phase, np.asarray(cohort.state.active, np.float64))  # frozen trials get nothing
        return np.asarray(metrics.score), np.asarray(metrics.metric), joules

    # ----------------------------------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        """Runs (or resumes) the study to the end; returns and writes ``results.json``."""
        t_start = time.perf_counter()
        ds = self._load_data()
        saved = self._saved_phases()
        fresh = not saved
        self._setup_energy(fresh)
        phases = self.spec.phases()

        progress, cohorts, start_phase = None, [], 0
        for phase in reversed(saved):
            try:
                progress = self._load_progress(phase)
                cohorts = self._restore(progress, ds, phase)
                start_phase = phase + 1
                break
            except (CheckpointError, OSError, json.JSONDecodeError, KeyError) as err:
                warnings.warn(f"phase {phase} cannot be restored ({err}); falling back to the previous phase", RuntimeWarning, stacklevel=2)
                progress, cohorts = None, []
        # Count attempts from the ledger: a run killed before its first phase completed left no
        # progress file, but its energy is in the ledger and must stay distinguishable.
        earlier = self.ledger.records()
        self.attempt = max((r.get("attempt", 0) for r in earlier), default=0) + 1
        self._total_joules, self._methods = 0.0, set()
        for r in earlier:
            if r["type"] == "window":
                self._tally(r)

        checkpoints = StudyCheckpoints(os.path.join(self.directory, "checkpoints"))
        checkpoints.discard_after(start_phase - 1)
        for stale in (p for p in saved if p >= start_phase):
            os.remove(self._progress_path(stale))
        try:
            if start_phase < len(phases):
                for c in cohorts:  # restored cohorts compile here, not inside their first training window
                    self._compile(c)
            if progress is None:
                progress = {"phase": -1, "infeasible": {}, "hardware": {}, "widths": {}, "trials": {}, "decisions": []}
                for cohort_spec in group_into_cohorts(list(self.configs.values())):
                    cohort = self._hardware_filter(cohort_spec, ds, progress["infeasible"], progress["hardware"])
                    if cohort is not None:
                        cohorts.append(cohort)
                for i, reason in progress["infeasible"].items():
                    progress["decisions"].append({"phase": "hardware", "trial_id": int(i), "kept": False, "reason": f"infeasible: {reason}"})
                for c in cohorts:
                    for t in c.trial_ids:
                        progress["trials"][str(t)] = {"score": None, "energy_spent": 0.0, "samples_spent": 0, "history": []}

            for p in range(start_phase, len(phases)):
                if not cohorts:
                    break
                name, budget = phases[p]
                last = p == len(phases) - 1
                cohorts = self._run_phase(p, name, budget, last, cohorts, progress, checkpoints)
            results = self._results(progress, time.perf_counter() - t_start)
        finally:
            checkpoints.close()
            self.meter.close()
        _atomic_write_json(os.path.join(self.directory, "results.json"), results)
        return results

    def _run_phase(self, p: int, name: str, budget: float, last: bool, cohorts: list[_Cohort], progress: dict, checkpoints: StudyCheckpoints) -> list[_Cohort]:
        from tqdm.auto import tqdm

        targets = {c.spec.name: self._steps(budget, c.spec.signature.batch_size) for c in cohorts}
        total_steps = sum(max(targets[c.spec.name] - int(np.max(np.asarray(c.state.step))), 0) for c in cohorts)
        bar = tqdm(total=total_steps, desc=f"{name}", unit="step", leave=True, disable=not self.progress_bar)
        candidates: list[Candidate] = []
        try:
            for c in cohorts:
                alive = int(sum(len(x.trial_ids) for x in cohorts))
                bar.set_postfix_str(f"trials alive {alive}, {self._energy_so_far_text()}, best {self._best_text(progress)}")
                base_scores = None
                eval_energy: dict[int, float | None] = {}
                if name == "explore":
                    base_scores, _, eval_energy = self._evaluate(c, "explore")
                before_samples = {t: progress["trials"][str(t)]["samples_spent"] for t in c.trial_ids}
                train_energy = self._train_to(c, targets[c.spec.name], name, bar)
                scores, metrics, end_eval = self._evaluate(c, name)
                step = np.asarray(c.state.step)
                diverged = ~np.asarray(c.state.active)
                diverged_at = np.asarray(c.state.diverged_at)
                bs = c.spec.signature.batch_size
                total_samples = self._steps(self.spec.max_budget, bs) * bs
                for row, t in enumerate(c.trial_ids):
                    record = progress["trials"][str(t)]
                    previous = record["score"] if base_scores is None else float(base_scores[row])
                    joules = [eval_energy.get(t, 0.0), train_energy[t], end_eval[t]]
                    last_energy = None if any(j is None for j in joules) else float(sum(joules))
                    spent = None if last_energy is None or record["energy_spent"] is None else record["energy_spent"] + last_energy
                    samples = int(step[row]) * bs
                    score = float(scores[row])
                    candidates.append(Candidate(
                        trial_id=t, cohort=c.spec.name, score=score,
                        gain=score - previous if previous is not None and math.isfinite(score) else 0.0,
                        energy_spent=spent, energy_last=last_energy, samples_spent=samples,
                        samples_last=samples - before_samples[t], samples_total=total_samples,
                        diverged=bool(diverged[row]), diverged_at=int(diverged_at[row]),
                        plateau_tolerance=self.spec.plateau_tolerance,
                    ))
                    record.update(score=_finite_or_none(score), metric=_finite_or_none(float(metrics[row])), energy_spent=spent, samples_spent=samples)
                    record["history"].append({"phase": name, "score": _finite_or_none(score), "samples": samples, "energy_spent": spent})
        finally:
            bar.close()

        if name == "explore":
            kept, records = exploration_filter(candidates, score_tolerance=self.spec.score_tolerance, energy_tolerance=self.spec.energy_tolerance)
        elif last:
            ranked_ids, records = halve(candidates, self.objective, eta=len(candidates) + 1)  # keep only the best
            kept = ranked_ids
        else:
            kept, records = halve(candidates, self.objective, self.spec.eta)
        progress["decisions"].extend({"phase": name, **r, "energy_method": self.meter.method} for r in records)
        if last:
            progress["selected"] = kept[0] if kept else None

        survivors = []
        kept_set = set(kept)
        for c in cohorts:
            rows = [i for i, t in enumerate(c.trial_ids) if t in kept_set]
            if not rows:
                continue
            if len(rows) < len(c.trial_ids):
                c.state = c.trainer.select(c.state, rows)
                c.trial_ids = [c.trial_ids[i] for i in rows]
                c.trainer.width = min(c.trainer.width or len(rows), len(rows))
            survivors.append(c)
        progress["alive"] = {c.spec.name: c.trial_ids for c in survivors}
        progress["widths"] = {c.spec.name: c.trainer.width for c in survivors}
        progress["rates"] = {c.spec.name: c.rate for c in survivors}
        progress["phase"] = p
        if survivors:  # Orbax refuses an empty tree; a phase with no survivor needs no checkpoint
            checkpoints.save(p, {c.spec.name: c.state for c in survivors})
            checkpoints.wait()  # committed before the phase is recorded as done
        _atomic_write_json(self._progress_path(p), progress)
        if not last:
            for c in survivors:
                if not c.trainer.is_compiled(c.state):  # a narrower cohort: compile outside training windows
                    self._compile(c)
        return survivors

    def _restore(self, progress: dict, ds: ArrayDataset, phase: int) -> list[_Cohort]:
        """Rebuilds the cohorts alive after ``phase`` from their checkpoint."""
        if not progress["alive"]:
            return []
        by_name = {c.name: c for c in group_into_cohorts(list(self.configs.values()))}
        cohorts, abstract = [], {}
        for name, ids in progress["alive"].items():
            spec = by_name[name]
            id_set = set(ids)
            sub = CohortSpec(spec.signature, tuple(sorted((c for c in spec.configs if c.trial_id in id_set), key=lambda c: ids.index(c.trial_id))))
            trainer = CohortTrainer(sub, ds, schedule_steps=self._schedule_steps(spec), width=progress["widths"].get(name), device_data=self._device_data())
            abstract[name] = jax.eval_shape(trainer.init)
            cohorts.append(_Cohort(sub, trainer, None, list(ids), progress.get("rates", {}).get(name)))
        checkpoints = StudyCheckpoints(os.path.join(self.directory, "checkpoints"))
        try:
            states = checkpoints.restore(phase, abstract)
        finally:
            checkpoints.close()
        for c in cohorts:
            c.state = states[c.spec.name]
            c.trainer.width = c.trainer.effective_width(len(c.trial_ids))
            if [int(t) for t in np.asarray(c.state.trial_id)] != c.trial_ids:
                raise CheckpointError(f"checkpoint rows of {c.spec.name} do not match the recorded survivors")
        return cohorts

    # ------------------------------------------------------------------------------------ results

    def _energy_so_far_text(self) -> str:
        if self._total_joules is None:
            return "energy unavailable"
        return f"{self._total_joules:.1f} J {','.join(sorted(self._methods)) or self.meter.method}"

    @staticmethod
    def _best_text(progress: dict) -> str:
        scores = [t["score"] for t in progress["trials"].values() if t["score"] is not None]
        return f"{max(scores):.4g}" if scores else "-"

    def _results(self, progress: dict, wall_seconds: float) -> dict[str, Any]:
        records = self.ledger.records()
        by_phase = summarize(records)
        selected = progress.get("selected")
        out: dict[str, Any] = {
            "study": self.directory, "mode": self.spec.mode, "objective": self.spec.objective,
            "energy_method": self.meter.method, "energy_note": self.hardware.get("energy_note", ""),
            "intensity_label": self.ledger.intensity_label, "idle": self.hardware["idle"],
            "energy_by_phase": by_phase, "wall_seconds_this_attempt": wall_seconds, "attempts": max((r.get("attempt", 0) for r in records), default=0),
            "decisions": progress["decisions"], "infeasible": progress["infeasible"], "hardware": progress["hardware"],
            "metric_name": TASK_METRIC[self._dataset.task], "num_configs": len(self.configs),
        }
        totals = [g["joules"] for g in by_phase.values()]
        out["total_joules"] = None if any(t is None for t in totals) else float(sum(totals))
        if selected is None:
            out["selected"] = None
            out["note"] = "no configuration survived (all diverged or infeasible)"
            return out
        trial = progress["trials"][str(selected)]
        own = [r for r in records if r["type"] == "trial" and r["trial_id"] == selected]
        joules = [r["joules"] for r in own]
        out["selected"] = {
            "trial_id": selected, "config": self.configs[selected].to_json()["values"],
            "score": trial["score"], "metric": trial["metric"], "samples": trial["samples_spent"],
            "energy_to_train_joules": None if any(j is None for j in joules) else float(sum(joules)),
            "energy_method": self.meter.method,
        }
        return out


def run_hyperband(directory: str | os.PathLike, spec: StudySpec, *, progress: bool = True, nvml: Any = None, dataset: ArrayDataset | None = None) -> dict[str, Any]:
    """Hyperband (Li et al. 2018): one successive-halving study per bracket, in ``bracket-S/``.

    ``spec.max_budget`` is R; bracket ``s`` samples ``n`` random configurations (seed ``spec.seed + s``)
    and halves them from budget ``R * eta**-s`` to R. The winner is the best score over the brackets.
    Finished brackets are read back, so a killed Hyperband run resumes bracket by bracket.
    """
    from sm2jax.scheduler import hyperband_brackets

    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    _atomic_write_json(os.path.join(directory, "spec.json"), {"hyperband": spec.to_json()})
    brackets, outcomes = hyperband_brackets(spec.max_budget, spec.eta), []
    for b in brackets:
        sub = dataclasses.replace(spec, mode="sh", sampler="random", num_samples=int(b["n"]), seed=spec.seed + int(b["s"]), min_budget=float(b["r"]), explore_budget=0.0, objective="performance")
        result = Study(os.path.join(directory, f"bracket-{b['s']}"), sub, progress=progress, nvml=nvml, dataset=dataset).run()
        outcomes.append({**b, "selected": result["selected"], "total_joules": result["total_joules"], "energy_method": result["energy_method"]})
    scored = [o for o in outcomes if o["selected"] is not None and o["selected"]["score"] is not None]
    best = max(scored, key=lambda o: o["selected"]["score"]) if scored else None
    totals = [o["total_joules"] for o in outcomes]
    results = {
        "study": directory, "mode": "hyperband", "brackets": outcomes,
        "selected": None if best is None else {**best["selected"], "bracket": best["s"]},
        "total_joules": None if any(t is None for t in totals) else float(sum(totals)),
        "energy_method": outcomes[0]["energy_method"] if outcomes else None,
    }
    _atomic_write_json(os.path.join(directory, "results.json"), results)
    return results
