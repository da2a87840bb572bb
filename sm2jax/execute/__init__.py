"""Where it trains: an executor trains a set of configurations to a budget on the devices and
reports what a decision needs (scores, steps, energy through the study's metering).

:class:`Executor` is the contract a study drives; :class:`~sm2jax.execute.workload.Workload` is the
one built in: the data on the devices, what a budget means in steps, and each cohort's
:class:`~sm2jax.execute.runner.CohortRunner` -- one jitted, vmapped program per cohort
(:mod:`~sm2jax.execute.trainer`, :mod:`~sm2jax.execute.steps`, :mod:`~sm2jax.execute.programs`,
:mod:`~sm2jax.execute.batches`), its rows (:mod:`~sm2jax.execute.rows`) on the ``trials`` mesh axis
(:mod:`~sm2jax.execute.placement`), at the width the pure policy of
:mod:`~sm2jax.execute.width_policy` chooses and :mod:`~sm2jax.execute.width_control` carries out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Executor:
    """What a study asks of where it trains (see the module docstring).

    A runner (one per cohort) trains its live trials to a step count in energy windows
    (``train_to``), evaluates them (``evaluate``), keeps a subset (``select``) and hands back its
    rows (``rows``) for the store's checkpoint.
    """

    data: Any  # the study's ArrayDataset
    chance: float | None  # the score of always guessing the majority class, where defined

    def steps(self, budget: float, batch_size: int) -> int:
        """Training steps a cumulative ``budget`` means at ``batch_size``."""
        raise NotImplementedError

    def planned(self, runner: Any, phases: Sequence[tuple[str, float]], from_phase: int) -> float:
        """Trial-steps the study still plans for ``runner``'s cohort over its round's ``phases``
        (``(name, cumulative budget)``) from ``from_phase`` on."""
        raise NotImplementedError

    def create_runner(self, cohort: Any, state: Any, phases: Sequence[tuple[str, float]]) -> Any | None:
        """A cohort's runner for its round's ``phases``, or ``None`` (its trials recorded as
        infeasible in ``state``)."""
        raise NotImplementedError

    def restore_runners(self, state: Any, phase: int, folder: Any, cohorts: dict[str, Any]) -> list[Any]:
        """The runners alive after ``phase``, restored from ``folder``'s checkpoint."""
        raise NotImplementedError
