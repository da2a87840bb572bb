"""A study's workload: its data on the devices, budgets in steps, and its cohorts' runners."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from sm2jax.budgets import steps_for
from sm2jax.cohort import CohortSpec
from sm2jax.data import ArrayDataset, load_dataset
from sm2jax.energy.metering import Metering
from sm2jax.execute import Executor
from sm2jax.execute.batches import device_put_dataset
from sm2jax.execute.placement import Placement
from sm2jax.execute.runner import CohortRunner
from sm2jax.execute.trainer import CohortTrainer
from sm2jax.execute.width_policy import WidthPolicy
from sm2jax.phases import StudyState, planned_trial_steps
from sm2jax.spec import StudySpec
from sm2jax.store.folder import StudyDir
from sm2jax.tasks import get_task


def study_data(spec: StudySpec, dataset: ArrayDataset | None = None) -> ArrayDataset:
    """The data a study trains on: ``dataset`` (in memory) or ``spec.dataset``'s loader, truncated
    as the spec says, scored by ``spec.task`` where it names one (a registered task: your loss on a
    built-in data set)."""
    ds = dataset if dataset is not None else load_dataset(spec.dataset, **spec.dataset_options)
    if dataset is None and (spec.max_train_examples or spec.max_val_examples):
        ds = ds.subset(spec.max_train_examples, spec.max_val_examples)
    if spec.task is not None and spec.task != ds.task:
        get_task(spec.task)  # one line naming the known tasks
        ds = dataclasses.replace(ds, task=spec.task)
    return ds


class Workload(Executor):
    """The data set (loaded once, one copy on the devices that every cohort reads), what a budget
    means in steps, and the runners of a study's cohorts: created through the hardware filter, or
    restored from a checkpoint.

    Args:
      spec: the study's spec.
      placement: the trials axis.
      policy: the width policy of every runner.
      metering: where the runners' energy windows go.
      dataset: an in-memory data set instead of ``spec.dataset``'s loader.
    """

    def __init__(
        self,
        spec: StudySpec,
        placement: Placement,
        policy: WidthPolicy,
        metering: Metering,
        dataset: ArrayDataset | None = None,
    ):
        self.spec, self.placement, self.policy, self.metering = spec, placement, policy, metering
        self._dataset = dataset
        self._on_device = None

    @functools.cached_property
    def data(self) -> ArrayDataset:
        return study_data(self.spec, self._dataset)

    @functools.cached_property
    def chance(self) -> float | None:
        """The score of always guessing the majority class (tasks with class labels), else ``None``."""
        if not get_task(self.data.task).majority_chance:
            return None
        return float(np.bincount(np.asarray(self.data.y_val).ravel()).max() / len(self.data.y_val))

    def steps(self, budget: float, batch_size: int) -> int:
        """Training steps that a cumulative ``budget`` means at ``batch_size``."""
        return steps_for(budget, self.spec.budget_unit, batch_size, self.data.num_train // batch_size)

    def plan(self, k: int, batch_size: int, done: int, phases: Sequence[tuple[str, float]], from_phase: int) -> float:
        """Trial-steps the study plans for ``k`` trials at ``batch_size``, ``done`` steps in, over
        their round's ``phases`` from ``from_phase`` on."""
        steps = lambda budget: self.steps(budget, batch_size)
        return planned_trial_steps(phases, steps, k, done, from_phase, self.spec.eta)

    def planned(self, runner: CohortRunner, phases: Sequence[tuple[str, float]], from_phase: int) -> float:
        done = int(runner.field("step").max())
        return self.plan(runner.k, runner.spec.signature.batch_size, done, phases, from_phase)

    def trainer(self, cohort: CohortSpec) -> CohortTrainer:
        if self._on_device is None:
            self._on_device = device_put_dataset(self.data, placement=self.placement)
        schedule = self.steps(self.spec.max_budget, cohort.signature.batch_size)
        return CohortTrainer(
            cohort, self.data, schedule_steps=schedule, device_data=self._on_device, placement=self.placement
        )

    def create_runner(
        self, cohort: CohortSpec, state: StudyState, phases: Sequence[tuple[str, float]]
    ) -> CohortRunner | None:
        """A cohort's runner at the width that fits (the hardware filter) for its round's ``phases``;
        trials that cannot run here (a batch larger than the data, no width fits in memory) are
        recorded as infeasible."""
        ids = [c.trial_id for c in cohort.configs]
        try:
            trainer = self.trainer(cohort)
        except ValueError as err:  # e.g. a batch larger than the data set
            state.infeasible.update({str(i): str(err) for i in ids})
            return None
        planned = self.plan(len(ids), cohort.signature.batch_size, 0, phases, 0)
        runner, notes = CohortRunner.create(cohort, trainer, self.metering, self.policy, planned_trial_steps=planned)
        state.hardware[cohort.name] = {"width": runner and runner.width, "notes": notes}
        if runner is None:
            state.infeasible.update({str(i): f"does not fit in device memory even alone: {notes[-1]}" for i in ids})
        else:
            state.hardware[cohort.name]["choices"] = runner.choices
        return runner

    def restore_runners(
        self, state: StudyState, phase: int, folder: StudyDir, cohorts: dict[str, CohortSpec]
    ) -> list[CohortRunner]:
        """The runners alive after ``phase`` from their checkpoint (rows gathered on the host at
        save time, re-chunked at the recorded width on this run's devices, however many)."""
        if not state.alive:
            return []
        trainers = {name: self.trainer(cohorts[name]) for name in state.alive}
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # each process reads every row
        abstract: dict[str, Any] = {
            name: jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local), trainers[name].abstract_rows(len(ids))
            )
            for name, ids in state.alive.items()
        }
        checkpoints = folder.checkpoints()
        try:
            rows = checkpoints.restore(phase, abstract)
        finally:
            checkpoints.close()
        return [
            CohortRunner.restore(
                cohorts[name], trainers[name], jax.device_get(rows[name]), ids, state, self.metering, self.policy
            )
            for name, ids in state.alive.items()
        ]
