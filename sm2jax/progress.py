"""One progress line for a whole study: trial-steps trained against those the study plans, its
phase, the energy and best score so far, and an ETA whose rate counts compilation.

The plan is successive halving's (:func:`sm2jax.phases.planned_trial_steps`: ``1/eta`` of each
cohort goes on per rung), re-planned at every phase from the trials still alive, so the total moves
as decisions are made. The rate is the average since the study started (``smoothing=0``), so time
spent compiling counts in the ETA; the line is redrawn every second, also while a cohort compiles.
"""

from __future__ import annotations

import threading
from typing import Any


def progress_bar_class():
    """Jupyter's widget bars where ``ipywidgets`` is installed, else text bars (which render in a
    notebook too; ``tqdm.auto`` would warn "IProgress not found" there)."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm


class StudyProgress:
    """The study's progress line (nothing is shown when ``enabled`` is false).

    Args:
      enabled: show it (process 0 of a study asked to show progress).
      refresh_seconds: how often the line is redrawn while nothing advances (compiling).
    """

    def __init__(self, enabled: bool, refresh_seconds: float = 1.0):
        self.bar = progress_bar_class()(
            total=0, desc="study", unit="trial-step", smoothing=0, leave=True, disable=not enabled
        )
        self._stop = threading.Event()
        self._ticker = None
        if enabled:
            self._ticker = threading.Thread(target=self._tick, args=(refresh_seconds,), daemon=True)
            self._ticker.start()

    def _tick(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            self.bar.refresh()

    def plan(self, remaining: float) -> None:
        """The trial-steps still planned from here (the total becomes those done plus these)."""
        self.bar.total = int(self.bar.n + max(remaining, 0))
        self.bar.refresh()

    def say(self, text: str) -> None:
        """What the study is doing now (the line's postfix)."""
        self.bar.set_postfix_str(text)

    def advance(self, trial_steps: int) -> None:
        self.bar.update(int(trial_steps))

    def close(self, finished: bool) -> None:
        """Stops redrawing; a finished study's line ends at 100%."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if finished:
            self.bar.total = self.bar.n
        self.bar.close()

    def __enter__(self) -> StudyProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(finished=exc[0] is None)
