"""A study: SM2 (or a baseline) over a search space, in a folder that survives kills.

Phases are ``explore`` (if enabled) then ``rung-1 .. rung-n``. A phase trains every surviving
cohort up to the phase's cumulative budget, evaluates, decides (:func:`sm2jax.phases.record_phase`),
gathers survivors and commits them (:meth:`sm2jax.store.folder.StudyDir.commit_phase`). A resumed
study restarts from the newest phase whose progress and checkpoint are both readable (falling back
to an older one with a warning), so a kill loses at most the phase in flight, and -- training being
deterministic given seeds and widths, which are stored -- reaches the same decisions.

:class:`Study` only runs this loop. The folder is :class:`~sm2jax.store.folder.StudyDir`'s, the spec
:mod:`sm2jax.spec`'s, data and runners :class:`~sm2jax.execute.workload.Workload`'s, a live cohort its
:class:`~sm2jax.execute.runner.CohortRunner`'s, energy :class:`~sm2jax.energy.stack.EnergyStack`'s,
decisions :mod:`sm2jax.phases`' and the results :mod:`sm2jax.report`'s.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax

from sm2jax.budget import StudyBudget, first_phase_fits
from sm2jax.cohort import blame, check_every_name_is_used, group_into_cohorts
from sm2jax.compile_cache import count_compiles, enable_compile_cache
from sm2jax.data import ArrayDataset
from sm2jax.distributed import barrier, is_primary
from sm2jax.energy.stack import EnergyStack
from sm2jax.execute.placement import Placement
from sm2jax.execute.programs import memory_limit_bytes
from sm2jax.execute.runner import CohortRunner
from sm2jax.execute.width_policy import WidthPolicy
from sm2jax.execute.workload import Workload, study_data
from sm2jax.handback import data_shapes, load_selected
from sm2jax.interrupts import deferred_interrupts
from sm2jax.phases import DecisionRules, StudyState, cohort_candidates, continue_after_stop, record_phase
from sm2jax.plan import StudyPlan, test_evals
from sm2jax.probe import probe, probe_cohorts
from sm2jax.progress import StudyProgress
from sm2jax.proposals import round_history, study_proposals
from sm2jax.report import assemble_results, partial_results
from sm2jax.rounds import (
    check_extension,
    propose,
    round_phases,
    round_record,
    schedule,
    select_across_rounds,
    several_rounds,
)
from sm2jax.schedule import get_scheduler
from sm2jax.search import get_searcher
from sm2jax.spec import StudySpec, bind, current_form, read_spec
from sm2jax.store.checkpoint import CheckpointError, StudyCheckpoints
from sm2jax.store.folder import StudyDir
from sm2jax.tasks import get_task
from sm2jax.viewers import BackgroundWriter, run_hparams, write_optuna, write_viewers
from sm2jax.yardsticks import forecast_yardsticks


class Study:
    """Runs, resumes and reports a study in ``directory`` (JAX's persistent compilation cache is
    turned on when it runs; ``SM2JAX_COMPILE_CACHE=off`` disables it).

    Args:
      directory: the study folder (created).
      spec: required for a new study; omitted to resume an existing one.
      objective: optional callable objective overriding ``spec.objective`` (not persisted: pass it
        again on resume).
      nvml: optional NVML module (a test double in tests).
      gpus: the GPUs to meter (see :class:`~sm2jax.energy.stack.EnergyStack`); default: those JAX
        computes on, found by PCI bus id.
      progress: show one progress line for the study (:mod:`sm2jax.progress`).
      dataset: an in-memory data set (instead of ``spec.dataset``'s loader).
      devices: the devices of the ``trials`` mesh axis: a count (the first ``n`` of
        ``jax.devices()``), a list, or ``None`` for all of them (every process's). Not part of the
        spec: a study checkpointed on N devices resumes on M.
    """

    def __init__(
        self,
        directory: Any,
        spec: StudySpec | None = None,
        *,
        objective: Callable | None = None,
        nvml: Any = None,
        gpus: Any = None,
        progress: bool = True,
        dataset: ArrayDataset | None = None,
        devices: int | Sequence[Any] | None = None,
    ):
        enable_compile_cache()  # a bad cache path is one line before anything is written
        self._options = dict(
            objective=objective, nvml=nvml, gpus=gpus, progress=progress, dataset=dataset, devices=devices
        )
        self.folder = StudyDir(directory)
        self.directory = self.folder.path
        self.spec = spec = bind(spec or read_spec(self.directory), dataset, directory)
        self.progress_bar = progress and is_primary()
        # With SM2's seed replicates; a bad space fails here, before anything is written. A study
        # that has run takes what its searcher proposed then (proposals.json), never proposes again.
        self.proposals, kept = study_proposals(self.folder, spec)
        self.rules = DecisionRules.of(spec, objective, self.proposals.replicate_of, get_scheduler(spec.mode))
        self.configs = {c.trial_id: c for c in self.proposals.all()}
        self.steps = schedule(spec)
        if not self.configs:
            raise ValueError("the search space produced no configuration")
        data = study_data(spec, dataset)  # a data set not prepared, or not known, fails before anything is written
        if not self.folder.has_run() and not several_rounds(spec):  # (later rounds may use it)
            check_every_name_is_used(list(self.configs.values()), list(spec.space), get_task(data.task))
        plan = self._plan_within_budget(spec, data, devices=devices, nvml=nvml, gpus=gpus)
        self.folder.claim(spec.to_json(), normalise=current_form)
        if is_primary():
            if not kept:
                self.folder.write_proposals(self.proposals.to_json())
            if plan is not None:
                self.folder.write_plan(plan)
        barrier("sm2jax-claim")  # spec.json is written (by process 0) before any process reads on
        self.placement = Placement.create(devices)
        # Several processes must take identical decisions: a width chosen from a process's own
        # clock (probe, narrowing) could differ between them, so there the width stays as started.
        single = jax.process_count() == 1
        policy = WidthPolicy(
            max_width=spec.width,
            memory_limit=spec.memory_limit_bytes or memory_limit_bytes(),
            probe=spec.probe_width and single,
            narrow=single,
            start=spec.width_start,
            quick=spec.quick_compile and single,
        )
        self.energy = EnergyStack.of(spec, self.placement.devices, self.folder.ledger_path, nvml=nvml, gpus=gpus)
        self.metering = self.energy.metering
        self.work = Workload(spec, self.placement, policy, self.metering, data)
        self.budget = StudyBudget(spec, self.metering, lambda: self._committed)
        self._state = StudyState()
        self._optuna = BackgroundWriter("Optuna storage (optuna.db)")
        self._committed = 0  # phases this run committed
        self._optuna_due, self._optuna_wrote = 0.0, False  # when optuna.db is next rewritten; written yet

    def run(self) -> dict[str, Any]:
        """Runs (or resumes) the study to the end; returns and writes ``results.json``."""
        cache_dir = enable_compile_cache()
        self._optuna_due, self._optuna_wrote = time.perf_counter() + self.spec.optuna_seconds, False
        with self.folder.lock():
            self._committed = 0
            try:
                with count_compiles() as tally:
                    self.folder.remove_temporaries()
                    results = self._run()
            finally:
                self._optuna.join()  # the last committed phase's optuna.db is whole before the folder is let go
            results["compilation"] = {**tally.to_json(), "cache_dir": cache_dir, "attempt": self.metering.attempt}
            if not self._committed:  # a finished study run again keeps the record of the run that compiled
                results["compilation"] = self._earlier_compilation() or results["compilation"]
            results["data"] = data_shapes(self.work.data)
            with deferred_interrupts():  # a finished study's writers complete (TensorBoard's hangs if cut)
                if is_primary():
                    viewed = {**results, "hparams": self._hparams(self._state)}
                    results["viewers"] = write_viewers(self.directory, viewed, self._state.trials, optuna=False)
                self.folder.write_results(results)
        return results

    def extend(self, samples: int, rounds: int = 1) -> dict[str, Any]:
        """Grows the study by ``samples`` configurations over ``rounds`` rounds, proposed by its
        searcher from everything it has measured, and runs them through the same schedule; every
        earlier result, energy record and checkpoint is kept, and the selection is made over every
        round. The spec records the growth (``extensions``). A study still unfinished finishes its
        own rounds first. Returns the results (``results.json``)."""
        check_extension(samples, rounds)
        grown = dataclasses.replace(
            self.spec, extensions=[*self.spec.extensions, {"samples": samples, "rounds": rounds}]
        )
        self.folder.grow(grown.to_json(), normalise=current_form)
        return Study(self.directory, grown, **self._options).run()

    def _plan_within_budget(self, spec: StudySpec, data: ArrayDataset, **probe_args: Any) -> dict[str, Any] | None:
        """A capped study that has not started is planned first (a stored plan of its spec, else
        :func:`sm2jax.probe.probe` in a temporary folder): a cap below what its first phase needs
        is one line before anything is written. Returns the plan to keep (``plan.json``, for the
        report's plan against actual), ``None`` when there is nothing new to keep."""
        capped = spec.max_energy_joules is not None or spec.max_wall_seconds is not None
        if not capped or self.folder.saved_phases():
            return None
        if jax.process_count() > 1:
            raise ValueError("a budget (--budget-kwh, --budget-hours) needs a single-process study: run it without one")
        stored = self.folder.read_plan(spec.to_json())
        plan = (
            StudyPlan.from_json(stored) if stored else plan_study(spec, dataset=data, same_process=True, **probe_args)
        )
        first_phase_fits(spec, plan)
        return None if stored else plan.to_json()

    def _continue_after_stop(self, state: StudyState, runners: list[CohortRunner], start: int) -> list[CohortRunner]:
        """A study a budget stopped: continues with the stopped phase's own survivors when the
        budget now affords the next phase (raised on resume), else trains nothing."""
        name = self.steps[start].label
        kept = set(state.stopped["kept"])
        reason = self._stop_reason(start, runners, kept)
        state.budget_checks += self.budget.take_checks()
        if reason is not None:
            self._progress.say(f"still stopped: {reason[1]}")
            return []
        ids = continue_after_stop(state, self.metering.attempt)
        out = []
        for r in runners:
            mine = [t for t in r.trial_ids if t in ids]
            if mine:
                if len(mine) < r.k:
                    r.select(mine)
                out.append(r)
        state.alive = {r.spec.name: r.trial_ids for r in out}
        self._progress.say(f"continuing with {name}: the budget now affords it")
        return out

    def _stop_reason(self, p: int, runners: list[CohortRunner], kept: set[int]) -> tuple[str, str] | None:
        """``(phase, why)`` when the budget cannot afford phase ``p`` for the ``kept`` trials."""
        return self.budget.stop_for(self.steps[p], runners, kept, self.work.steps, test_evals(self.work.data))

    def _follow_in_optuna(self, last: bool) -> None:
        """Rewrites ``optuna.db`` on its thread after a committed phase, when ``optuna_seconds``
        passed since the study started or last wrote it, or at the last phase of a study it
        followed (see :class:`~sm2jax.spec.StudySpec`)."""
        now = time.perf_counter()
        if now >= self._optuna_due or (last and self._optuna_wrote):
            self._optuna.submit(lambda: write_optuna(self.directory, partial_results(self.folder)))
            self._optuna_due, self._optuna_wrote = now + self.spec.optuna_seconds, True

    def _earlier_compilation(self) -> dict[str, Any] | None:
        """The compile record of the ``results.json`` already here (``None``: none, or unreadable)."""
        try:
            return self.folder.results().get("compilation") if self.folder.exists("results.json") else None
        except (OSError, ValueError):
            return None

    def _hparams(self, state: StudyState) -> dict[str, dict[str, Any]]:
        configs = {t: c.to_json()["values"] for t, c in self.configs.items()}
        return run_hparams(configs, state.decisions, state.selected)

    def selected_model(self, trial_id: int | None = None):
        """The trained model of the selection (or of finalist ``trial_id``) of this finished study:
        a :class:`~sm2jax.handback.TrainedModel` (see :func:`sm2jax.handback.load_selected`)."""
        return load_selected(self.directory, trial_id, dataset=self.work.data)

    def _run(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        saved = self.folder.saved_phases()
        measure = not saved or not self.folder.exists("hardware.json")
        barrier("sm2jax-setup")  # every process has read the folder before process 0 writes to it
        damage = self.energy.open()
        try:
            hardware = self.energy.hardware_record(self.folder, measure, self.spec.idle_seconds)
        except BaseException:
            self.energy.close()  # the meter (and NVML) opened above is closed on every path
            raise
        state, runners, start = None, [], 0
        for phase in reversed(saved):
            try:
                state = StudyState.from_json(self.folder.load_progress(phase))
                cohorts = self._cohorts(self.steps[phase].round)
                runners, start = self.work.restore_runners(state, phase, self.folder, cohorts), phase + 1
                break
            except (CheckpointError, OSError, ValueError, KeyError, TypeError) as err:
                fallback = f"phase {phase} cannot be restored ({err}); falling back to the previous phase"
                warnings.warn(fallback, RuntimeWarning, stacklevel=3)
                state, runners = None, []
        checkpoints = self.folder.checkpoints()
        self.folder.discard_after(start - 1, checkpoints)
        self._progress = progress = StudyProgress(self.progress_bar)
        finished = False
        try:
            if state is not None and state.stopped is not None and start < len(self.steps):
                runners = self._continue_after_stop(state, runners, start)
            if state is None:
                state = StudyState(metric_name=get_task(self.work.data.task).metric_name)
                runners = self._start_round(1, state)
            for p in range(start, len(self.steps)):
                if self.steps[p].index == 0 and self.steps[p].round > 1:  # a round's proposals, then its cohorts
                    runners = self._start_round(self.steps[p].round, state)
                if runners:  # (none: a stop, or a round with nothing that runs here, goes on to the next)
                    runners = self._run_phase(p, runners, state, checkpoints)
            finished = True
            self.metering.flush()
            self.metering.close_span()  # the attempt's whole span, windows and the time between them
            self._state = state
            hardware = self.energy.record_events(self.folder, self.metering.attempt, hardware)
            return assemble_results(
                state,
                self.energy.ledger.records(),
                study=self.directory,
                spec=self.spec,
                configs=self.configs,
                replicate_of=self.rules.replicate_of,
                hardware=hardware,
                energy_method=self.energy.method,
                intensity_label=self.energy.ledger.intensity_label,
                metric_name=get_task(self.work.data.task).metric_name,
                placement=self.placement.describe(),
                wall_seconds=time.perf_counter() - t_start,
                ledger_damage=damage,
                plan=self.folder.read_plan(self.spec.to_json()),
            )
        finally:
            progress.close(finished)
            try:
                # After an error or Ctrl-C, whatever was measured is still written, at the meter's
                # resolution where this process alone decides (a sample is collective across processes).
                self.metering.flush(wait=jax.process_count() == 1)
                if jax.process_count() == 1:  # (a sample is collective across processes: not on one's error)
                    self.metering.close_span()
            finally:
                checkpoints.close()
                self.energy.record_events(self.folder, self.metering.attempt)
                self.energy.close()

    def _cohorts(self, round_: int) -> dict[str, Any]:
        """Round ``round_``'s cohorts by name (each round is grouped alone, as it was started)."""
        return {c.name: c for c in group_into_cohorts(self.proposals.of_round(round_))}

    def _start_round(self, round_: int, state: StudyState) -> list[CohortRunner]:
        """Round ``round_``'s runners: its configurations as kept in ``proposals.json``, or proposed
        now from every result so far (and a warm start's) and kept before anything trains; then
        its cohorts, compiled or loaded (a cohort an earlier round compiled is in the table)."""
        progress = self._progress
        first = next(p for p, s in enumerate(self.steps) if s.round == round_)
        self._record_earlier_rounds(state, first)
        if round_ > self.proposals.rounds():
            progress.say(f"round {round_}: proposing from {len(state.trials)} configurations measured so far")
            history = round_history(self.spec, state, self.configs, self.proposals)
            running = [c for t, c in self.configs.items() if str(t) not in state.infeasible]
            configs = propose(self.spec, round_, history, first_id=max(self.configs) + 1, compiled=running)
            sampler = self.spec.effective().sampler
            seen = len(history) if get_searcher(sampler).learns else 0  # (what the proposals were made from)
            self.proposals.add(round_, configs, sampler=sampler, observations=seen)
            if is_primary():
                self.folder.write_proposals(self.proposals.to_json())  # kept before any of it trains
            barrier("sm2jax-proposals")
            self.configs.update({c.trial_id: c for c in configs})
        cohorts, phases = list(self._cohorts(round_).values()), round_phases(self.steps, round_)
        progress.plan(sum(self.work.plan(c.size, c.signature.batch_size, 0, phases, 0) for c in cohorts))
        runners = []
        for i, c in enumerate(cohorts, start=1):  # seconds to minutes each: the line says which
            progress.say(f"compiling (or loading) the programs of cohort {i}/{len(cohorts)}, {c.name}")
            with blame(c, "compile"):  # the first trace runs the user's model, loss and optimizer
                runners += [r] if (r := self.work.create_runner(c, state, phases)) is not None else []
        state.start([t for r in runners for t in r.trial_ids])
        return runners

    def probe_cohorts(self, fraction: float, min_call_seconds: float = 0.25) -> dict[str, Any]:
        """This study's cohorts probed (:func:`sm2jax.probe.probe_cohorts`), in its folder."""
        return probe_cohorts(self, fraction, min_call_seconds)

    def _run_phase(
        self, p: int, runners: list[CohortRunner], state: StudyState, checkpoints: StudyCheckpoints
    ) -> list[CohortRunner]:
        """Phase ``p``: trains and scores every runner, decides, keeps the survivors (at the last
        phase of a round, every finalist's rows) and commits; returns the runners that go on."""
        step, work = self.steps[p], self.work
        name, last = step.label, step.round_end
        candidates = self._train_and_score(step, runners, state)
        self.metering.flush()  # every window of this phase written (at the meter's resolution), then attributed
        ids = [c.trial_id for c in candidates]
        joules = [self.metering.trial_joules(name, ids, kinds) for kinds in (("train", "eval"), ("train",))]
        stop = None if last else lambda d: self._stop_reason(p + 1, runners, set(d.kept))
        decision = record_phase(
            state,
            name,
            candidates,
            *joules,
            self.rules,
            last=last,
            energy_method=self.energy.method,
            stop=stop,
            kind=step.name,
        )
        state.budget_checks += self.budget.take_checks()
        if not last and state.stopped is not None:  # the budget cannot afford the next phase: this one is the last
            last = True
            self._progress.say(f"stopped after {name}: {state.stopped['reason']}; selected from {name}")
        # The last phase's checkpoint keeps every finalist (each can be loaded: sm2jax.handback).
        finalists, final_rows = {f["trial_id"] for f in decision.finalists} if last else set(), {}
        for r in runners:
            if ids := [t for t in r.trial_ids if t in finalists]:
                final_rows[r.spec.name] = (ids, r.rows(ids), r)
        survivors = []
        for r in runners:
            ids = [t for t in r.trial_ids if t in decision.kept]
            if not ids:
                continue
            if len(ids) < r.k:
                r.select(ids)
                if not last:
                    r.narrow_for_survivors(work.planned(r, round_phases(self.steps, step.round), step.index + 1))
            if last and work.data.has_test:  # once, for the selected configuration only
                with blame(r.spec, f"{name} (test split)"):
                    state.test = {"trial_id": ids[0], **r.evaluate(name, split="test").first()}
                state.yardsticks = forecast_yardsticks(work.data)
            survivors.append(r)
        for r in runners:
            if r.spec.name in state.hardware:
                state.hardware[r.spec.name]["choices"] = r.choices
        if last:
            state.alive = {name: ids for name, (ids, _, _) in final_rows.items()}
            state.runners = {name: r.to_json() for name, (_, _, r) in final_rows.items()}
            saved = {name: rows for name, (_, rows, _) in final_rows.items()}
            self._end_round(p, state)
        else:
            state.alive = {r.spec.name: r.trial_ids for r in survivors}
            state.runners = {r.spec.name: r.to_json() for r in survivors}
            saved = {r.spec.name: r.rows() for r in survivors}
        state.phase = p
        state.completed_by[name] = self.metering.attempt
        self._commit(p, state, checkpoints, saved, last)
        return [] if last else survivors  # a phase a budget made the last ends the study

    def _train_and_score(self, step: Any, runners: list[CohortRunner], state: StudyState) -> list[Any]:
        """Trains every runner to ``step``'s budget in energy windows and evaluates it: the phase's
        candidates (:func:`sm2jax.phases.cohort_candidates`), each trial's losses recorded."""
        work, progress, name = self.work, self._progress, step.label
        phases = round_phases(self.steps, step.round)
        progress.plan(sum(work.planned(r, phases, step.index) for r in runners))  # re-planned from the trials alive
        win = {"window_seconds": self.spec.window_seconds, "steps_per_window": self.spec.steps_per_window}
        candidates = []
        for r in runners:
            alive = sum(x.k for x in runners)
            progress.say(f"{name}: trials alive {alive}, {self.metering.so_far_text()}, best {state.best_score_text()}")
            on_steps = lambda steps, k=r.k: progress.advance(steps * k)  # every row steps in lockstep
            bs = r.spec.signature.batch_size
            with blame(r.spec, name):
                # An untrained model's score is the reference for "has it learned?"; for classification
                # that reference is chance, so the evaluations of untrained models are skipped there.
                base = r.evaluate(name) if step.name == "explore" and work.chance is None else None
                before = {t: state.trials[str(t)]["samples_spent"] for t in r.trial_ids}
                planned = work.planned(r, phases, step.index)
                trained = r.train_to(
                    work.steps(step.budget, bs), name, planned_trial_steps=planned, on_steps=on_steps, **win
                )
                state.record_training(trained.losses, bs)
                rows = {f: r.field(f) for f in ("step", "active", "diverged_at")}
                total = work.steps(self.spec.max_budget, bs) * bs
                end = r.evaluate(name)
            candidates += cohort_candidates(
                state, r.spec.name, r.trial_ids, end, base, rows, bs, total, before, work.chance, self.rules
            )
        return candidates

    def _end_round(self, p: int, state: StudyState) -> None:
        """Records round ``steps[p].round`` as finished (its selection, finalists, test score and
        where its finalists are kept) and, after the first, selects over every round so far."""
        step = self.steps[p]
        self._record_earlier_rounds(state, p)
        state.rounds = [r for r in state.rounds if r["round"] != step.round]
        state.rounds.append(round_record(step, p, state, self.proposals, self.spec))
        if len(state.rounds) > 1:
            select_across_rounds(state, self.rules, step.name)

    def _record_earlier_rounds(self, state: StudyState, p: int) -> None:
        """Records the rounds that ended before phase ``p`` and are not recorded yet (a study from
        before rounds were recorded, extended since), from the progress of their last phase, so
        that their finalists' checkpoints are kept from now on."""
        recorded = {r["round"] for r in state.rounds}
        for q, s in enumerate(self.steps[:p]):
            if s.round_end and s.round not in recorded:
                earlier = StudyState.from_json(self.folder.load_progress(q))
                state.rounds.append(round_record(s, q, earlier, self.proposals, self.spec))
        state.rounds.sort(key=lambda r: r["round"])

    def _commit(self, p: int, state: StudyState, checkpoints: StudyCheckpoints, saved: dict, last: bool) -> None:
        """Records phase ``p``: its checkpoint and progress, then the viewers that follow the study."""
        # Ctrl-C and SIGTERM wait for the commit and the viewers (TensorBoard's writer hangs if cut).
        with deferred_interrupts():
            keep = [r["phase"] for r in state.rounds]  # every round's finalists stay loadable
            self.folder.commit_phase(p, state.to_json(), checkpoints, saved, keep=keep)
            self._committed += 1
            if is_primary():  # TensorBoard and optuna-dashboard follow the study while it runs
                viewed = {"curves": state.curves, "hparams": self._hparams(state)}
                write_viewers(self.directory, viewed, state.trials, optuna=False)
                self._follow_in_optuna(last)


def plan_study(spec: StudySpec, **kwargs: Any) -> StudyPlan:
    """The plan of ``spec`` before it runs (:func:`sm2jax.probe.probe` with :class:`Study`;
    ``kwargs``: ``dataset``, ``devices``, ``nvml``, ``gpus``, ``same_process``)."""
    if several_rounds(spec):
        raise ValueError(
            "sm2jax plan predicts a study of one round (later rounds' proposals are not known before the first ends): plan it with --set rounds=1; each round costs about what a study of its size does"
        )
    return probe(spec, Study, **kwargs)
