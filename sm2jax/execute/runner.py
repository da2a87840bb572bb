"""One owner per live cohort: its trainer, rows, trial ids, width, compiled programs and speed.

A :class:`CohortRunner` is what a study holds for each live cohort. It measures (compile seconds,
seconds per step, FLOPs, memory) and carries out the decisions of :mod:`sm2jax.execute.width_policy`; it is
the only place that compiles (always inside a ``compile`` energy window, never inside a training
window), and its metered calls return typed records: :meth:`~CohortRunner.compile`,
:meth:`~CohortRunner.train_to` and :meth:`~CohortRunner.evaluate`. Every width choice is recorded in
:attr:`CohortRunner.choices` with its reason.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from sm2jax.cohort import CohortSpec
from sm2jax.energy.metering import Metering
from sm2jax.execute.programs import is_oom, program_bytes
from sm2jax.execute.records import CompileRecord, EvalRecord, TrainRecord
from sm2jax.execute.rows import CohortState, chunk_rows, gather_rows, num_chunks, row_view
from sm2jax.execute.trainer import CohortTrainer
from sm2jax.execute.width_control import WidthControl
from sm2jax.execute.width_policy import (
    WidthPolicy,
    quick_start,
    start_widths,
)
from sm2jax.store.checkpoint import CheckpointError

log = logging.getLogger(__name__)


class CohortRunner(WidthControl):
    """A live cohort: its trainer, its rows in W-wide chunks, and its width policy.

    Args:
      spec: the cohort's signature and configurations (all of them, alive or not).
      trainer: the cohort's programs.
      rows: host rows of the live trials (leaves ``[K, ...]``), in the order of their trial ids.
      width: the vmap width of its chunks.
      metering: where energy windows go.
      policy: the width policy.
      rate_seconds: measured seconds per step of a chunk, per width, of the current (quick or
        optimised) program (restored on resume).
      probe_pending: whether the probe decision is still to be taken.
      quick: whether the cohort trains with quick programs.
    """

    def __init__(
        self,
        spec: CohortSpec,
        trainer: CohortTrainer,
        rows: CohortState,
        width: int,
        metering: Metering,
        policy: WidthPolicy,
        *,
        rate_seconds: dict[int, float] | None = None,
        probe_pending: bool = False,
        choices: list[dict] | None = None,
        quick: bool = False,
    ):
        self.spec = spec
        self.trainer = trainer
        self.trial_ids = [int(t) for t in np.asarray(rows.trial_id)]
        self.placement = trainer.placement
        self.width = self.placement.round_width(int(width))
        self.chunks = chunk_rows(rows, self.width, self.placement)
        self.metering = metering
        self.policy = policy
        self.step_seconds: dict[int, float] = dict(rate_seconds or {})
        self.probe_pending = probe_pending
        self.choices: list[dict[str, Any]] = list(choices or [])
        self.quick = bool(quick)
        self._quick_noted = False  # the decision to keep the quick program is recorded once per run
        self._proven: set[int] = set()  # widths that trained a window without running out of memory
        self._timed: set[tuple[int, bool]] = set()  # (width, quick) builds whose first call has run

    # ---------------------------------------------------------------------------------- creation

    @classmethod
    def create(
        cls,
        spec: CohortSpec,
        trainer: CohortTrainer,
        metering: Metering,
        policy: WidthPolicy,
        *,
        planned_trial_steps: float | None = None,
    ) -> tuple[CohortRunner | None, list[str]]:
        """Initialises every trial and finds the width to start at (:func:`start_widths`, the
        first that fits), inside one compile window; with ``planned_trial_steps`` (the study's plan
        for the cohort) a CPU cohort predicted to train briefly starts with the quick program
        (:func:`quick_start`). Returns ``(runner, notes)``; ``runner`` is ``None`` when even width 1
        does not fit (``notes`` say why)."""
        ids = [c.trial_id for c in spec.configs]
        placement = trainer.placement
        notes: list[str] = []
        with metering.window(
            f"compile:{spec.name}", phase="compile", cohort=spec.name, trial_ids=ids, kind="compile"
        ) as w:
            t0 = time.perf_counter()
            widest = policy.widest(len(ids), placement.round_width)
            narrow = policy.starts_narrow()
            candidates = start_widths(widest, placement.size, narrow, placement.round_width)
            # Decided from shapes alone, before any trial is initialised: a model too large for the
            # device is infeasible at once, however many trials it has.
            quick, predicted = False, None
            if policy.starts_quick() and planned_trial_steps is not None:
                fwd = trainer.forward_flops_per_example(trainer.abstract_chunk(candidates[0]))
                if fwd is not None:
                    quick, predicted = quick_start(planned_trial_steps, fwd, trainer.batch_size, placement.size)
            width = None
            for c in candidates:
                need = program_bytes(lambda c=c: trainer.compile_train(trainer.abstract_chunk(c), quick))
                if policy.fits(need):
                    width = c
                    break
                notes.append(f"width {c} needs {need / 2**20:.1f} MiB > {policy.memory_limit / 2**20:.1f} MiB")
            if width is None:
                return None, notes
            rows = trainer.init_rows()
            pending = policy.probe and (widest > placement.size if narrow else width > placement.size)
            runner = cls(spec, trainer, rows, width, metering, policy, probe_pending=pending, quick=quick)
            trainer.compile_eval(runner.chunks[0])
            w.cover(runner.chunks)
        if narrow:
            reason = "narrowest width (CPU backend: a W-wide step costs about W single steps, and no survivor count needs another program)"
        else:
            reason = "widest width that fits in memory" if notes else "widest width (all trials)"
        if predicted is not None:
            reason += f"; {'quick' if quick else 'optimised'} program: predicted training {predicted:.2f} s from FLOPs"
        details = {} if predicted is None else {"predicted_train_s": predicted}
        runner._choose(width, reason, compile_seconds=time.perf_counter() - t0, notes=notes, quick=quick, **details)
        return runner, notes

    @classmethod
    def restore(
        cls,
        spec: CohortSpec,
        trainer: CohortTrainer,
        rows: CohortState,
        trial_ids: list[int],
        state: Any,
        metering: Metering,
        policy: WidthPolicy,
    ) -> CohortRunner:
        """The runner of a cohort checkpointed by a study whose progress record is ``state``
        (:class:`~sm2jax.phases.StudyState`): its rows re-chunked at the recorded width, its
        measured rates (when the devices are the same) and pending decisions."""
        if [int(t) for t in np.asarray(rows.trial_id)] != trial_ids:
            raise CheckpointError(f"checkpoint rows of {spec.name} do not match the recorded survivors")
        saved = state.runners[spec.name]
        same_devices = saved.get("devices", 1) == trainer.placement.size  # rates measured elsewhere do not carry over
        return cls(
            spec,
            trainer,
            rows,
            saved["width"],
            metering,
            policy,
            rate_seconds={int(w): s for w, s in saved["step_seconds"].items()} if same_devices else None,
            probe_pending=saved["probe_pending"],
            quick=saved.get("quick", False) and policy.starts_quick(),
            choices=state.hardware.get(spec.name, {}).get("choices", []),
        )

    # ---------------------------------------------------------------------------------- rows

    @property
    def k(self) -> int:
        return len(self.trial_ids)

    def _row_values(self, per_chunk: list[Any]) -> np.ndarray:
        """Per-row device values of every chunk (e.g. training metrics) for the live trials, on the host."""
        return np.concatenate(self.placement.host(per_chunk))[self.placement.slots(self.k, self.width)]

    def field(self, name: str) -> np.ndarray:
        """A per-trial field (``step``, ``active``, ``diverged_at``) of the live rows, on the host."""
        return row_view(self.chunks, name, self.k, self.placement)

    def trial_devices(self) -> list[Any]:
        """The device each live trial's row is on (rows are chunked in trial order)."""
        return self.placement.trial_devices(self.k, self.width)

    def rows(self, trial_ids: list[int] | None = None) -> CohortState:
        """The live rows (or those of ``trial_ids``) gathered on the host (for checkpoints)."""
        return gather_rows(self.chunks, self.trial_ids if trial_ids is None else trial_ids, self.placement)

    def select(self, trial_ids: list[int]) -> None:
        """Keeps the rows of ``trial_ids`` (survivors), gathered on the host and re-chunked at the
        same width: the programs stay, the chunk count and padding change."""
        if not trial_ids:
            raise ValueError("select needs at least one trial")
        rows = gather_rows(self.chunks, trial_ids, self.placement)
        self.trial_ids = [int(t) for t in trial_ids]
        self.chunks = chunk_rows(rows, self.width, self.placement)

    def _set_width(self, width: int, rows: CohortState | None = None) -> None:
        width = self.placement.round_width(width)
        if width != self.width or rows is not None:
            rows = self.rows() if rows is None else rows
            self.width = int(width)
            self.chunks = chunk_rows(rows, self.width, self.placement)

    def _choose(self, width: int, reason: str, **details: Any) -> None:
        self.choices.append({"width": int(width), "reason": reason, **details})
        log.info("%s: width %d (%s)", self.spec.name, width, reason)

    # ---------------------------------------------------------------------------------- compile

    def _quick(self, kind: str) -> bool:
        """Whether this cohort's ``kind`` program is the quick build (only training has one)."""
        return self.quick and kind == "train"

    def _is_compiled(self, kind: str, width: int) -> bool:
        return self.trainer.is_compiled(kind, width, quick=self._quick(kind))

    def is_compiled(self) -> bool:
        return self._is_compiled("train", self.width) and self._is_compiled("eval", self.width)

    def _compile_window(self):
        return self.metering.window(
            f"compile:{self.spec.name}",
            phase="compile",
            cohort=self.spec.name,
            trial_ids=self.trial_ids,
            kind="compile",
            after=self.chunks,
        )

    def compile(self) -> CompileRecord:
        """Compiles the train and eval programs at the current width inside a ``compile`` window
        (nothing is measured when both are compiled already)."""
        if self.is_compiled():
            return CompileRecord(self.width, 0.0)  # no window: nothing measured
        with self._compile_window():
            t0 = time.perf_counter()
            self.trainer.compile_train(self.chunks[0], self.quick)
            self.trainer.compile_eval(self.chunks[0])
        seconds = time.perf_counter() - t0
        log.info(
            "compiled %s (width %d%s) in %.1f s", self.spec.name, self.width, ", quick" if self.quick else "", seconds
        )
        return CompileRecord(self.width, seconds)

    def compile_seconds(self, kind: str) -> float:
        """Measured seconds the ``kind`` program at the current width (and build) took to compile:
        the estimate of what another width of this cohort costs."""
        return self.trainer.compile_seconds(kind, self.width, quick=self._quick(kind)) or 0.0

    # ---------------------------------------------------------------------------------- train

    def steps_per_window(self, window_seconds: float, fixed: int | None, pending_first: bool) -> int:
        if fixed:
            return fixed
        t = self.step_seconds.get(self.width)
        if t is None:  # no measurement yet: a short first window when the probe needs a rate
            return max(1, self.trainer.steps_per_epoch // 8) if pending_first else 10**9
        return max(1, int(window_seconds / (t * num_chunks(self.k, self.width))))

    def _train_calls(self, window_steps: int) -> tuple[list, float | None]:
        """Dispatches ``window_steps`` steps of every chunk; returns the outputs and, for a build's first
        call, the seconds of its first step, run alone: a build's first call pays one-time costs
        that are not training, so the window's rate comes from the steady steps (the same steps in
        two calls give the same bits)."""
        if (self.width, self.quick) in self._timed or window_steps <= 1:
            return [self.trainer.train(c, window_steps, self.quick) for c in self.chunks], None
        t0 = time.perf_counter()
        first = jax.block_until_ready(self.trainer.train(self.chunks[0], 1, self.quick))
        head = time.perf_counter() - t0
        outs = [self.trainer.train(first[0], window_steps - 1, self.quick)]
        return outs + [self.trainer.train(c, window_steps, self.quick) for c in self.chunks[1:]], head

    def train_to(
        self,
        target_steps: int,
        phase: str,
        *,
        planned_trial_steps: float,
        window_seconds: float = 2.0,
        steps_per_window: int | None = None,
        on_steps: Callable[[int], None] | None = None,
    ) -> TrainRecord:
        """Trains every live trial to ``target_steps`` in energy windows (:class:`Metering`
        attributes their energy); returns the steps each trial took.

        ``planned_trial_steps`` (trial-steps the study still plans for this cohort, this phase
        included) feeds the probe decision after the first window. An out-of-memory error halves
        the width and retries the window.
        """
        taken = {t: 0 for t in self.trial_ids}
        losses: list[tuple[int, int, float]] = []
        t_start = time.perf_counter()
        while (window_steps := self._next_window(target_steps, window_seconds, steps_per_window)) is not None:
            trained = self._train_window(window_steps, phase)
            if trained is None:  # out of memory: the width was halved, the window is retried
                continue
            self._record_window(*trained, window_steps, taken, losses)
            if on_steps is not None:
                on_steps(window_steps)
            left = max(planned_trial_steps - sum(taken.values()), 0.0)
            if self.quick:
                self._maybe_optimise(left)
            if self.probe_pending:
                self._maybe_probe(left)
        return TrainRecord(taken, time.perf_counter() - t_start, losses)

    def _next_window(self, target_steps: int, window_seconds: float, steps_per_window: int | None) -> int | None:
        """The steps of the next energy window toward ``target_steps`` (its programs compiled),
        ``None`` when every live trial is there or every trial diverged."""
        active = self.field("active")
        if not active.any():  # every trial diverged: nothing left to train
            return None
        done = int(self.field("step")[active].max())  # active trials move in lockstep
        remaining = target_steps - done
        if remaining <= 0:
            return None
        self.compile()
        return min(remaining, self.steps_per_window(window_seconds, steps_per_window, self.probe_pending or self.quick))

    def _train_window(self, window_steps: int, phase: str) -> tuple[Any, list, float | None, np.ndarray] | None:
        """One energy window of ``window_steps`` steps: ``(window, outputs, timed first step,
        steps before)``, or ``None`` after running out of memory (its energy charged as
        ``oom-retry``, the width halved)."""
        before = self.field("step")
        # Training donates the chunks. Until a width has trained once without running out of
        # memory, its rows are kept on the host for the retry (a width that trained once needs
        # no more memory later: its programs' sizes are fixed).
        kept = None if self.width in self._proven or self.width <= self.placement.size else self.rows()
        with self.metering.window(
            phase, phase=phase, cohort=self.spec.name, trial_ids=self.trial_ids, after=self.chunks
        ) as w:
            try:
                outs, head = self._train_calls(window_steps)
                w.cover(outs)
            except Exception as err:
                if not is_oom(err) or kept is None:
                    raise
                w.phase = w.kind = "oom-retry"  # the failed attempt still used energy: its own line
                outs = None
            else:
                self.chunks = [state for state, _ in outs]
                # Read once the window has closed (reading the steps blocks on the outputs).
                w.steps = lambda: self.field("step") - before  # 0 for frozen (diverged) trials
                flops = lambda: self.trainer.flops_per_trial_step(self.chunks[0], self.quick) or 1.0
                w.work = lambda: w.steps * flops()
                w.batch_size, w.devices = self.spec.signature.batch_size, self.trial_devices()
        if outs is None:
            self._set_width(max(self.placement.size, self.width // 2), rows=kept)
            self._choose(self.width, "out of memory at run time: halved")
            warnings.warn(
                f"{self.spec.name}: out of memory; retrying at vmap width {self.width}", RuntimeWarning, stacklevel=3
            )
            return None
        return w, outs, head, before

    def _record_window(
        self,
        w: Any,
        outs: list,
        head: float | None,
        before: np.ndarray,
        window_steps: int,
        taken: dict[int, int],
        losses: list[tuple[int, int, float]],
    ) -> None:
        """What a window measured: the width proven, its seconds per chunk-step, each trial's steps
        and mean loss."""
        self._proven.add(self.width)
        self._timed.add((self.width, self.quick))
        seconds, chunk_steps = w.reading.seconds, window_steps * len(self.chunks)
        if head is None or seconds <= head:
            self.step_seconds[self.width] = seconds / chunk_steps
        else:  # the steps after the timed first one
            self.step_seconds[self.width] = (seconds - head) / (chunk_steps - 1)
        steps = w.steps
        loss = self._row_values([m.loss_mean for _, m in outs])
        now = self.field("step")
        for row, t in enumerate(self.trial_ids):
            taken[t] += int(steps[row])
            if steps[row] > 0:
                losses.append((t, int(now[row]), float(loss[row])))

    def evaluate(self, phase: str, split: str = "val") -> EvalRecord:
        """Score, metric and the score's standard error of every live trial on ``split`` in one
        ``PHASE:eval`` (``PHASE:test``) window; frozen (diverged) trials and padding rows receive no
        energy. The test split is only ever evaluated for the selected configuration."""
        self.compile()
        kind = "eval" if split == "val" else split
        with self.metering.window(
            f"{phase}:{kind}",
            phase=phase,
            cohort=self.spec.name,
            trial_ids=self.trial_ids,
            kind=kind,
            after=self.chunks,
        ) as w:
            outs = w.cover([self.trainer.evaluate(c, split) for c in self.chunks])
            w.work = self.field("active").astype(np.float64)
            w.devices = self.trial_devices()
        slots = self.placement.slots(self.k, self.width)
        field = lambda name: np.concatenate([getattr(o, name) for o in outs])[slots]
        return EvalRecord(field("score"), field("metric"), field("score_se"), field("loss"))

    # ---------------------------------------------------------------------------------- persist

    def to_json(self) -> dict[str, Any]:
        """What a resumed study needs besides the rows: width, measured rates, pending decisions."""
        return {
            "width": self.width,
            "devices": self.placement.size,
            "step_seconds": {str(w): s for w, s in self.step_seconds.items()},
            "probe_pending": self.probe_pending,
            "quick": self.quick,
        }
