"""Per-phase checkpoints of every surviving cohort, with Orbax.

Step ``p`` of the study's ``CheckpointManager`` holds ``{cohort name: CohortState}`` after phase
``p`` finished *and* its survivors were gathered: the exact state the next phase starts from.
Orbax cannot select rows at restore, so survivors are gathered on the host (``CohortRunner.select``)
before saving. Saves are asynchronous and atomic (a directory rename commits them); the study waits
for a save to commit before it records the phase as done.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from typing import Any

import orbax.checkpoint as ocp

from sm2jax._absl import quiet_absl

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be restored (missing, torn or corrupt)."""


def _quiet_orbax():
    """Orbax logs an ERROR (through absl) for every unreadable metadata file it meets, several per
    corrupt step; the study reports the fallback once, as a warning, so these are silenced here."""
    return quiet_absl(logging.CRITICAL)


class StudyCheckpoints:
    """Thin wrapper over ``ocp.CheckpointManager`` for a study's ``checkpoints/`` folder."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3):
        self.directory = os.path.abspath(os.fspath(directory))
        self.max_to_keep = max_to_keep  # pruned by :meth:`prune`, which also keeps named steps
        options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=True, create=True)
        with _quiet_orbax():
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, phase: int, states: dict[str, Any]) -> None:
        """Starts an asynchronous save of ``states`` as step ``phase`` (call :meth:`wait` to commit)."""
        self.manager.save(phase, args=ocp.args.StandardSave(states), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        with _quiet_orbax():
            self.manager.reload()
            return sorted(self.manager.all_steps())

    def restore(self, phase: int, abstract: dict[str, Any]) -> dict[str, Any]:
        """Restores step ``phase`` into the structure of ``abstract`` (``jax.eval_shape`` output).

        Raises:
          CheckpointError: if the step is missing or cannot be read.
        """
        if phase not in self.steps():
            raise CheckpointError(f"no committed checkpoint for phase {phase} in {self.directory}")
        try:
            with _quiet_orbax():
                return self.manager.restore(phase, args=ocp.args.StandardRestore(abstract))
        except Exception as err:
            raise CheckpointError(f"checkpoint of phase {phase} is unreadable: {type(err).__name__}: {err}") from err

    def prune(self, keep: Sequence[int] = ()) -> list[int]:
        """Deletes every committed step but the newest ``max_to_keep`` and those in ``keep`` (the
        last phase of every round: its finalists stay loadable); returns the deleted steps."""
        steps = self.steps()
        gone = [s for s in steps[: -self.max_to_keep] if s not in set(keep)]
        with _quiet_orbax():
            for step in gone:
                self.manager.delete(step)
        return gone

    def discard_after(self, phase: int) -> list[int]:
        """Deletes every step after ``phase``: a step the study cannot trust (corrupt, or committed
        by a run killed before it recorded the phase) would otherwise block the re-save."""
        gone = [step for step in self.steps() if step > phase]
        with _quiet_orbax():
            for step in gone:
                try:
                    self.manager.delete(step)
                except Exception:
                    shutil.rmtree(os.path.join(self.directory, str(step)), ignore_errors=True)
            self.manager.reload()
        return gone

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
