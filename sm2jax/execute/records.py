"""The typed records a :class:`~sm2jax.execute.runner.CohortRunner`'s metered calls return."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class CompileRecord:
    width: int
    seconds: float  # wall seconds of the compile window (0 when nothing new was compiled)


@dataclasses.dataclass
class TrainRecord:
    steps: dict[int, int]  # steps taken in this call, per trial id (energy: Metering.trial_joules)
    seconds: float
    losses: list[tuple[int, int, float]] = dataclasses.field(default_factory=list)  # (trial, step, loss)
    """Per energy window and trial that trained in it: its step count after the window and its mean
    training loss over the window's steps (the learning curve)."""


@dataclasses.dataclass
class EvalRecord:
    scores: np.ndarray  # [K], higher is better
    metrics: np.ndarray  # [K]
    score_se: np.ndarray  # [K], the scores' standard errors (sampling noise of the split)
    losses: np.ndarray | None = None  # [K], the validation loss

    def first(self) -> dict[str, float | None]:
        """The first row's metric, score and standard error (``None`` for a non-finite figure)."""
        finite = lambda x: float(x) if np.isfinite(x) else None
        return {"metric": finite(self.metrics[0]), "score": finite(self.scores[0]), "score_se": float(self.score_se[0])}
