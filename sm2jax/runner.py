"""One owner per cohort: its trainer, rows, trial ids, width, compiled programs and measured speed.

A :class:`CohortRunner` is what a study holds for each live cohort. It is the only place that
decides a cohort's vmap width, the only place that compiles (always inside a ``compile`` energy
window, never inside a training window), and it exposes metered calls that return typed records:
:meth:`~CohortRunner.compile`, :meth:`~CohortRunner.train_to` and :meth:`~CohortRunner.evaluate`.

Width policy (:class:`WidthPolicy`), all choices recorded in :attr:`CohortRunner.choices`:

1. **Start.** On accelerators, the widest width ``min(K, policy.max_width)``, halving until its
   training program fits in ``policy.memory_limit`` bytes (XLA's own memory analysis): one small
   model cannot fill a GPU, and padding rows cost almost nothing there. On a CPU backend, width 1:
   a W-wide step costs about W single steps there (vmapping only amortises dispatch, which the
   in-program step loop already does: the best width trained 0.8-1.2x as fast as width 1 on MLPs
   from 64 to 1024x1024 units), width 1 compiles fastest, and survivors never need a narrower
   program. Measured on 2 CPU cores: MNIST-1D 50,000, successive halving over 12 configurations,
   17.5 s instead of 26.2 s (compilation 5.0 s instead of 12.7 s, training equal); digits 6.3 s
   instead of 7.2 s. It holds for full search too (every row kept): MNIST-1D 50,000, 12
   configurations x 9 epochs, 36.6 s from width 1 against 46.3 s from width 6 (training 32.0 s
   against 33.6 s). Nothing fits: the cohort is infeasible.
2. **Probe only when it pays.** After the first training window, the cohort's remaining training
   time is predicted as :math:`T = S \\cdot t_W / W` (``S`` planned trial-steps, ``t_W`` the
   measured seconds per step of a W-wide chunk; a program's first call, whose one-time costs are
   not training, runs one step alone and is left out of ``t_W``). Probing compiles the other
   candidates (1, the powers of four and the widest width; those that do not fit in memory are
   skipped), each costing about the measured compile time :math:`c_W` of the current program. It
   runs only if
   :math:`T > \\text{payoff} \\cdot c_W \\cdot n` for ``n`` new programs (payoff 5 from a wide start: a
   probe that finds nothing costs at most a fifth of the training it steers; 10 from width 1 on a
   CPU, where the best width gains at most ~20%); otherwise the start stays.
3. **Narrow for survivors only when it pays.** With ``K' < W`` survivors the padded chunk still
   costs ``t_W`` per step (padding rows compute, then discard). Candidates are ``w = K'`` (no
   padding) and every narrower width the probe measured; the one with the largest net saving
   :math:`S' (\\lceil K'/W \\rceil t_W - \\lceil K'/w \\rceil t_w) - c_w` is compiled if that is
   positive (``t_w`` measured by the probe, else :math:`t_W w / W`, which overstates the saving on
   accelerators that are not yet full and is the conservative side for compile cost on CPUs).
4. **Out of memory at run time** halves the width and retries the window (from rows kept on the
   host until a width has trained once: training donates its chunks).

Quick programs (CPU backends, :data:`sm2jax.trainer.QUICK_COMPILE`). The quick build of a small
model's training program compiles in about half the time (0.3-0.7 s less) and steps up to 2.1x
slower, so it pays only for a cohort whose whole training is short. Before any training program is
compiled, the cohort's training time is predicted from FLOPs, without a clock (the same choice on
every run):

.. math::  \\hat T = S \\cdot 3 F_{\\text{fwd}} B \\,/\\, (n \\cdot \\text{CPU\\_FLOPS\\_PER\\_DEVICE})

(``S`` planned trial-steps, :math:`F_{\\text{fwd}}` one example's forward FLOPs from XLA's cost
analysis of the evaluation program, compiled first, backward ~2 forwards, ``n`` devices), and the
cohort starts quick only if :math:`\\hat T (s - 1) <` :data:`QUICK_COMPILE_SAVING` (``s`` =
:data:`QUICK_SLOWDOWN`). Should a quick cohort train longer than predicted, after each window the
optimised program is compiled once the measured remaining training makes the predicted saving
:math:`T (1 - 1/s)` exceed its predicted compile time :math:`r \\cdot c_q` (``T`` as in step 2,
``r`` = :data:`OPTIMISED_COMPILE_RATIO`, ``c_q`` the quick program's measured compile time).
Big convolutional models compile *slower* quick (ResNet-18 at width 4: 6.1 s instead of 4.8 s); at
~0.2 GFLOP per trial-step their training is predicted short only below ~15 trial-steps.

With several devices (:mod:`sm2jax.placement`) every width is a multiple of the device count, and
"width 1" above means one row per device.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from sm2jax.cohort import CohortSpec
from sm2jax.energy import EnergyLedger, EnergyMonitor, add_known
from sm2jax.trainer import (
    CohortState,
    CohortTrainer,
    chunk_rows,
    compiled_memory_bytes,
    gather_rows,
    num_chunks,
    row_view,
)

log = logging.getLogger(__name__)


_INTERRUPT = threading.Event()


def request_interrupt(signum=None, frame=None) -> None:
    """SIGINT handler of the command line: raises ``KeyboardInterrupt`` as Python's default does,
    and also marks the request, so that the study stops at its next energy window even when the
    exception was raised inside a garbage-collection callback (JAX registers one), where Python
    prints "Exception ignored" and carries on."""
    _INTERRUPT.set()
    raise KeyboardInterrupt


def probe_candidates(width: int) -> list[int]:
    """Widths the probe measures for a ``width``-wide cohort: 1, the powers of four below it, and it."""
    return sorted({1, *(4**i for i in range(1, 8) if 4**i < width), width})


def is_oom(err: Exception) -> bool:
    return isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower()


QUICK_SLOWDOWN = 2.2
"""How much slower a quick training program steps than the optimised one: above the worst measured
(1.04-2.1x on 2 CPU cores, MLPs from 64 to 1024x1024 units at batch 16 to 256, the worst an MLP
256x256 at batch 32; small CNNs stepped faster quick), so that both decisions lean to the optimised
program."""

OPTIMISED_COMPILE_RATIO = 2.0
"""How much longer the optimised training program takes to compile than the quick one (measured
1.2-1.9x, same models): the upper end, so that a switch is never taken for a gain it cannot pay."""

QUICK_COMPILE_SAVING = 0.3
"""Seconds a quick training program saves in compilation: the least measured on small models (MLPs,
small CNNs, GRU: 0.3-0.7 s on 2 CPU cores)."""

CPU_FLOPS_PER_DEVICE = 1e10
"""Training FLOP/s of one CPU host device for the quick-start prediction: the low end of what was
measured (15-40 GFLOP/s per device on 2 cores, MLPs at batch 16-128), so that training predicted
short is short."""


def train_program_bytes(trainer: CohortTrainer, chunk: CohortState, quick: bool = False) -> float | None:
    """Bytes the training program of ``chunk``'s width needs (compiling it): XLA's memory
    analysis, ``inf`` when compiling runs out of memory, ``None`` when the backend reports nothing."""
    try:
        return compiled_memory_bytes(trainer.compile_train(chunk, quick))
    except Exception as err:
        if not is_oom(err):
            raise
        return math.inf


class Metering:
    """Energy windows of a study written to its ledger, at the meter's resolution.

    ``begin``/``end`` bracket work; :meth:`record` queues a window with the trials that worked in
    it. A window is written once the queued windows span at least the meter's resolution (1 s for
    an NVML counter that updates every ~100 ms): shorter windows are merged with the next ones, never
    turned into ``None``. A merged reading (first window's start to last window's end) is split
    among its windows by their busy seconds, then among each window's trials by work, and every
    record says it was merged. :meth:`flush` closes the queue at a decision point, waiting out the
    rest of the resolution if needed (that wait is measured and charged, and said so).
    :meth:`trial_joules` gives the attributed joules per trial of a phase.
    """

    def __init__(
        self,
        monitor: EnergyMonitor,
        ledger: EnergyLedger,
        attempt: int,
        on_window: Callable[[dict], None] | None = None,
    ):
        self.monitor = monitor
        self.ledger = ledger
        self.attempt = attempt
        self.on_window = on_window
        self.resolution_s = monitor.resolution_s
        self._pending: list[dict[str, Any]] = []
        self._totals: dict[tuple[str, str, int], float | None] = {}
        self._seq = 0

    def begin(self, name: str, after: Any = None):
        if _INTERRUPT.is_set():  # a Ctrl-C whose KeyboardInterrupt was swallowed (see request_interrupt)
            _INTERRUPT.clear()
            raise KeyboardInterrupt
        return self.monitor.begin(name, after=after)

    def end(self, window, outputs: Any = None):
        return self.monitor.end(window, outputs)

    def record(
        self,
        reading,
        *,
        phase: str,
        cohort: str,
        trial_ids: list[int],
        work,
        steps=None,
        batch_size: int = 0,
        kind: str = "train",
        devices: list[Any] | None = None,
    ) -> None:
        """Queues one window's reading for its trials (``work`` >= 0 each; ``kind``: ``train``,
        ``eval``, ``test``, ``compile``, ``probe`` or ``oom-retry``; ``devices``: the JAX device each
        trial's row ran on, so that each device's energy goes to its own trials) and writes the queue
        once it spans the meter's resolution."""
        steps = np.zeros(len(trial_ids), np.int64) if steps is None else np.asarray(steps, np.int64)
        keys = None if devices is None else [self.monitor.meter.device_keys(d) for d in devices]
        self._pending.append(
            {
                "reading": reading,
                "phase": phase,
                "cohort": cohort,
                "trial_ids": [int(t) for t in trial_ids],
                "work": [float(w) for w in work],
                "steps": steps.tolist(),
                "samples": (steps * batch_size).tolist(),
                "kind": kind,
                "trial_keys": keys,
            }
        )
        if self._span() >= self.resolution_s:
            self._write()

    def _span(self) -> float:
        first, last = self._pending[0]["reading"], self._pending[-1]["reading"]
        return last.started + last.seconds - first.started

    def flush(self, wait: bool = True) -> None:
        """Writes every queued window. If they span less than the meter's resolution, first waits
        out the rest (``wait``; otherwise, e.g. after an error, the short span is written as read)."""
        if not self._pending:
            return
        short = self.resolution_s - self._span()
        stop = None
        if short > 0 and wait:
            time.sleep(short)
            stop = self.monitor.sample()
        self._write(stop, waited=short if stop is not None else 0.0)

    def _write(self, stop=None, waited: float = 0.0) -> None:
        entries, self._pending = self._pending, []
        first, last = entries[0]["reading"], entries[-1]["reading"]
        if len(entries) == 1 and stop is None:
            merged = last
        elif first.start is None or (last.stop is None and stop is None):
            merged = dataclasses.replace(
                last, joules=None, per_device=None, valid=False, note="cannot merge readings without samples"
            )
        else:
            merged = self.monitor.between(last.name, first.start, stop or last.stop)
        busy = [e["reading"].seconds for e in entries]
        weights = [b / sum(busy) for b in busy] if sum(busy) > 0 else [1 / len(entries)] * len(entries)
        note = merged.note
        if len(entries) > 1 or waited > 0:
            note = (
                f"merged: {len(entries)} window(s) over {merged.seconds:.2f} s"
                + (
                    f" (waited {waited:.2f} s to reach the meter's {self.resolution_s:g} s resolution)"
                    if waited > 0
                    else ""
                )
                + "; split by busy seconds"
                + (f"; {merged.note}" if merged.note else "")
            )
        for e, share in zip(entries, weights):
            r = e["reading"]
            part = dataclasses.replace(
                r,
                joules=None if merged.joules is None else merged.joules * share,
                per_device=None if merged.per_device is None else {d: v * share for d, v in merged.per_device.items()},
                valid=merged.valid,
                note=note,
                method=merged.method,
                uncertainty=merged.uncertainty,
            )
            self._seq += 1
            recs = self.ledger.record(
                part,
                phase=e["phase"],
                cohort=e["cohort"],
                trial_ids=e["trial_ids"],
                work=e["work"],
                steps=e["steps"],
                samples=e["samples"],
                trial_keys=e["trial_keys"],
                extra={
                    "attempt": self.attempt,
                    "kind": e["kind"],
                    "window_id": f"{self.attempt}-{self._seq}",
                    "merged_windows": len(entries),
                    "resolution_s": self.resolution_s,
                    "uncertainty": merged.uncertainty,
                },
            )
            for rec in recs[1:]:
                key = (e["phase"], e["kind"], rec["trial_id"])
                self._totals[key] = add_known(self._totals.get(key, 0.0), rec["joules"])
            if self.on_window is not None:
                self.on_window(recs[0])

    def trial_joules(
        self, phase: str, trial_ids: list[int], kinds: tuple[str, ...] = ("train", "eval")
    ) -> dict[int, float | None]:
        """Joules written so far for each trial in ``phase`` over window ``kinds`` (``None`` if any
        of its windows was unavailable). Call :meth:`flush` first."""
        out = {}
        for t in trial_ids:
            values = [self._totals[(phase, k, t)] for k in kinds if (phase, k, t) in self._totals]
            out[t] = None if any(v is None for v in values) else float(sum(values))
        return out


@dataclasses.dataclass(frozen=True)
class WidthPolicy:
    """How a runner chooses its width (see the module docstring).

    Attributes:
      max_width: cap on the width (``None``: all trials).
      memory_limit: bytes a program may need (``None``: no check).
      probe: allow measuring narrower widths.
      narrow: allow a narrower program for fewer survivors (off in a multi-process study, whose
        processes must take the same decision and do not share a clock).
      start: ``narrowest`` (width 1, probing wider widths), ``widest`` (the widest that fits,
        probing narrower ones) or ``auto``: narrowest on CPU backends, widest on accelerators.
      quick: start with quick training programs on a CPU backend, switching to the optimised one
        when it pays (off in a multi-process study, for the same reason as ``narrow``).
      payoff: the probe runs only when predicted training time exceeds ``payoff`` times its
        predicted compile time (``None``: 5 from a wide start, 10 from a narrow one). From the
        widest width, the best width trained 0-40% faster on a 2-core CPU (MLP 256x256 on MNIST-1D:
        10%; MLP 1024x1024 at batch 16: width 1, ~30%), so a probe costing at most a fifth of the
        training it steers pays where it matters; on accelerators long studies clear the bar
        easily. From width 1 on a CPU the best width gained at most ~20% (MLP 256x256, batch 32), so
        a probe must cost at most a tenth to leave a gain (at 5 it cost MNIST-1D 50,000 full search
        as much as it saved).
    """

    max_width: int | None = None
    memory_limit: int | None = None
    probe: bool = True
    narrow: bool = True
    payoff: float | None = None
    start: str = "auto"
    quick: bool = True

    def __post_init__(self):
        if self.start not in ("auto", "narrowest", "widest"):
            raise ValueError(f"width start: unknown {self.start!r}; known: auto, narrowest, widest")

    def starts_narrow(self) -> bool:
        """``auto``: narrowest on a CPU backend, widest on accelerators (see the module docstring)."""
        return self.start == "narrowest" or (self.start == "auto" and jax.default_backend() == "cpu")

    def starts_quick(self) -> bool:
        """Whether cohorts start with quick programs: only on a CPU backend (XLA's options there)."""
        return self.quick and jax.default_backend() == "cpu"

    def fits(self, need: float | None) -> bool:
        """Whether a program needing ``need`` bytes (``None``: unknown) fits the memory limit."""
        return self.memory_limit is None or need is None or need <= self.memory_limit

    def probe_payoff(self) -> float:
        return self.payoff if self.payoff is not None else 10.0 if self.starts_narrow() else 5.0


@dataclasses.dataclass
class CompileRecord:
    width: int
    seconds: float  # wall seconds of the compile window (0 when nothing new was compiled)


@dataclasses.dataclass
class TrainRecord:
    steps: dict[int, int]  # steps taken in this call, per trial id (energy: Metering.trial_joules)
    seconds: float


@dataclasses.dataclass
class EvalRecord:
    scores: np.ndarray  # [K], higher is better
    metrics: np.ndarray  # [K]
    score_se: np.ndarray  # [K], the scores' standard errors (sampling noise of the split)


class CohortRunner:
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
      quick: whether the cohort trains with quick programs (see the module docstring).
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
        """Initialises every trial and finds the widest width that fits (step 1 of the policy),
        inside one compile window; with ``planned_trial_steps`` (the study's plan for the cohort) a
        CPU cohort predicted to train briefly starts with the quick program (see the module
        docstring). Returns ``(runner, notes)``; ``runner`` is ``None`` when even width 1 does not
        fit (``notes`` say why)."""
        ids = [c.trial_id for c in spec.configs]
        k = len(ids)
        window = metering.begin(f"compile:{spec.name}")
        t0 = time.perf_counter()
        rows = trainer.init_rows()
        notes: list[str] = []
        width = None
        placement = trainer.placement
        widest = placement.round_width(min(policy.max_width or k, k))
        narrow = policy.starts_narrow()
        # One row per device at the narrowest; every width is a multiple of the device count.
        candidates = (
            [placement.size]
            if narrow
            else sorted({placement.round_width(widest // 2**i) for i in range(widest.bit_length())}, reverse=True)
        )
        quick, predicted = False, None
        if policy.starts_quick() and planned_trial_steps is not None:
            fwd = trainer.forward_flops_per_example(
                chunk_rows(jax.tree.map(lambda a: a[: candidates[0]], rows), candidates[0], placement)[0]
            )
            if fwd is not None:
                predicted = (
                    planned_trial_steps * 3.0 * fwd * trainer.batch_size / (CPU_FLOPS_PER_DEVICE * placement.size)
                )
                quick = predicted * (QUICK_SLOWDOWN - 1.0) < QUICK_COMPILE_SAVING
        for w in candidates:
            need = train_program_bytes(trainer, chunk_rows(jax.tree.map(lambda a: a[:w], rows), w, placement)[0], quick)
            if policy.fits(need):
                width = w
                break
            notes.append(f"width {w} needs {need / 2**20:.1f} MiB > {policy.memory_limit / 2**20:.1f} MiB")
        if width is None:
            metering.record(
                metering.end(window), phase="compile", cohort=spec.name, trial_ids=ids, work=np.ones(k), kind="compile"
            )
            return None, notes
        runner = cls(
            spec,
            trainer,
            rows,
            width,
            metering,
            policy,
            probe_pending=policy.probe and (widest > placement.size if narrow else width > placement.size),
            quick=quick,
        )
        trainer.compile_eval(runner.chunks[0])
        reading = metering.end(window, runner.chunks)
        metering.record(reading, phase="compile", cohort=spec.name, trial_ids=ids, work=np.ones(k), kind="compile")
        if narrow:
            reason = "narrowest width (CPU backend: a W-wide step costs about W single steps, and no survivor count needs another program)"
        else:
            reason = "widest width that fits in memory" if notes else "widest width (all trials)"
        if predicted is not None:
            reason += f"; {'quick' if quick else 'optimised'} program: predicted training {predicted:.2f} s from FLOPs"
        runner._choose(
            width,
            reason,
            compile_seconds=time.perf_counter() - t0,
            notes=notes,
            quick=quick,
            **({} if predicted is None else {"predicted_train_s": predicted}),
        )
        return runner, notes

    # ---------------------------------------------------------------------------------- rows

    @property
    def k(self) -> int:
        return len(self.trial_ids)

    def field(self, name: str) -> np.ndarray:
        """A per-trial field (``step``, ``active``, ``diverged_at``) of the live rows, on the host."""
        return row_view(self.chunks, name, self.k, self.placement)

    def trial_devices(self) -> list[Any]:
        """The device each live trial's row is on (rows are chunked in trial order)."""
        return self.placement.trial_devices(self.k, self.width)

    def rows(self) -> CohortState:
        """The live rows gathered on the host (for checkpoints)."""
        return gather_rows(self.chunks, self.trial_ids, self.placement)

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

    def compile(self) -> CompileRecord:
        """Compiles the train and eval programs at the current width inside a ``compile`` window
        (nothing is measured when both are compiled already)."""
        if self.is_compiled():
            return CompileRecord(self.width, 0.0)  # no window: nothing measured
        window = self.metering.begin(f"compile:{self.spec.name}", after=self.chunks)
        t0 = time.perf_counter()
        self.trainer.compile_train(self.chunks[0], self.quick)
        self.trainer.compile_eval(self.chunks[0])
        reading = self.metering.end(window)
        seconds = time.perf_counter() - t0
        self.metering.record(
            reading,
            phase="compile",
            cohort=self.spec.name,
            trial_ids=self.trial_ids,
            work=np.ones(self.k),
            kind="compile",
        )
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
        t_start = time.perf_counter()
        while True:
            active = self.field("active")
            if not active.any():  # every trial diverged: nothing left to train
                break
            done = int(self.field("step")[active].max())  # active trials move in lockstep
            remaining = target_steps - done
            if remaining <= 0:
                break
            self.compile()
            chunk = min(
                remaining, self.steps_per_window(window_seconds, steps_per_window, self.probe_pending or self.quick)
            )
            before = self.field("step")
            # Training donates the chunks. Until a width has trained once without running out of
            # memory, its rows are kept on the host for the retry (a width that trained once needs
            # no more memory later: its programs' sizes are fixed).
            kept = None if self.width in self._proven or self.width <= self.placement.size else self.rows()
            window = self.metering.begin(phase, after=self.chunks)
            build = (self.width, self.quick)
            head = None
            try:
                if build not in self._timed and chunk > 1:
                    # A build's first call pays one-time costs (on 2 CPU cores ~30 ms for an MLP whose
                    # step takes 40 us) that are not training: its first step runs alone and is
                    # timed apart, so that the window's rate comes from steady steps. The same steps
                    # in two calls give the same bits.
                    t0 = time.perf_counter()
                    first = jax.block_until_ready(self.trainer.train(self.chunks[0], 1, self.quick))
                    head = time.perf_counter() - t0
                    outs = [self.trainer.train(first[0], chunk - 1, self.quick)] + [
                        self.trainer.train(c, chunk, self.quick) for c in self.chunks[1:]
                    ]
                else:
                    outs = [self.trainer.train(c, chunk, self.quick) for c in self.chunks]
                reading = self.metering.end(window, outs)
            except Exception as err:
                if not is_oom(err) or kept is None:
                    raise
                # The failed attempt still used energy: keep it, on its own line.
                self.metering.record(
                    self.metering.end(window),
                    phase="oom-retry",
                    cohort=self.spec.name,
                    trial_ids=self.trial_ids,
                    work=np.ones(self.k),
                    kind="oom-retry",
                )
                self._set_width(max(self.placement.size, self.width // 2), rows=kept)
                self._choose(self.width, "out of memory at run time: halved")
                warnings.warn(
                    f"{self.spec.name}: out of memory; retrying at vmap width {self.width}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            self.chunks = [state for state, _ in outs]
            self._proven.add(self.width)
            self._timed.add(build)
            chunk_steps = chunk * len(self.chunks)
            if head is None or reading.seconds <= head:
                self.step_seconds[self.width] = reading.seconds / chunk_steps
            else:  # the steps after the timed first one
                self.step_seconds[self.width] = (reading.seconds - head) / (chunk_steps - 1)
            steps = self.field("step") - before  # 0 for frozen (diverged) trials
            work = steps * (self.trainer.flops_per_trial_step(self.chunks[0], self.quick) or 1.0)
            self.metering.record(
                reading,
                phase=phase,
                cohort=self.spec.name,
                trial_ids=self.trial_ids,
                work=work,
                steps=steps,
                batch_size=self.spec.signature.batch_size,
                kind="train",
                devices=self.trial_devices(),
            )
            for row, t in enumerate(self.trial_ids):
                taken[t] += int(steps[row])
            if on_steps is not None:
                on_steps(chunk)
            if self.quick:
                self._maybe_optimise(max(planned_trial_steps - sum(taken.values()), 0.0))
            if self.probe_pending:
                self._maybe_probe(max(planned_trial_steps - sum(taken.values()), 0.0))
        return TrainRecord(taken, time.perf_counter() - t_start)

    def _predicted_train_s(self, planned_trial_steps: float) -> float:
        """Seconds of training left, :math:`S \\cdot t_W / W`, from the current width's measured step."""
        return planned_trial_steps * self.step_seconds[self.width] / self.width

    def _maybe_optimise(self, planned_trial_steps: float) -> None:
        """Trades the quick training program for the optimised one once the predicted saving on the
        cohort's remaining training exceeds the optimised program's predicted compile time."""
        w = self.width
        predicted = self._predicted_train_s(planned_trial_steps)
        saving = predicted * (1.0 - 1.0 / QUICK_SLOWDOWN)
        cost = OPTIMISED_COMPILE_RATIO * self.compile_seconds("train")
        if saving <= cost:
            if not self._quick_noted:
                self._quick_noted = True
                self._choose(
                    w,
                    f"quick program kept: predicted saving {saving:.2f} s <= optimised compile {cost:.2f} s",
                    quick=True,
                    predicted_train_s=predicted,
                    predicted_saving_s=saving,
                    predicted_compile_s=cost,
                )
            return
        self.quick = False
        record = self.compile()
        # Rates of the quick program, scaled until the next window measures the optimised one.
        self.step_seconds = {c: t / QUICK_SLOWDOWN for c, t in self.step_seconds.items()}
        self._choose(
            w,
            f"optimised program: predicted saving {saving:.2f} s > compile {cost:.2f} s",
            quick=False,
            predicted_train_s=predicted,
            predicted_saving_s=saving,
            predicted_compile_s=cost,
            compile_seconds=record.seconds,
        )

    def _maybe_probe(self, planned_trial_steps: float) -> None:
        """Step 2 of the policy, once: probe narrower widths if predicted training time pays for it."""
        self.probe_pending = False
        w = self.width
        t_w = self.step_seconds[w]
        predicted = self._predicted_train_s(planned_trial_steps)
        n = self.placement.size
        widest = self.placement.round_width(min(self.policy.max_width or self.k, self.k))
        candidates = [n * c for c in probe_candidates(max(w, widest) // n) if n * c != w and n * c <= widest]
        c_w = self.compile_seconds("train")
        cost = c_w * len(candidates) + self.compile_seconds("eval")
        payoff = self.policy.probe_payoff()
        if predicted <= payoff * cost:
            self._choose(
                w,
                f"probe skipped: predicted training {predicted:.2f} s <= {payoff:g} x predicted compile {cost:.2f} s",
                predicted_train_s=predicted,
                predicted_compile_s=cost,
            )
            return
        rows = self.rows()
        window = self.metering.begin(f"compile:{self.spec.name}", after=self.chunks)
        t0 = time.perf_counter()
        by_width = {c: chunk_rows(jax.tree.map(lambda a: a[:c], rows), c, self.placement)[0] for c in [*candidates, w]}
        for c in candidates:
            if not self.policy.fits(train_program_bytes(self.trainer, by_width[c], self.quick)):
                del by_width[c]  # a wider candidate that does not fit is not measured
        if len(by_width) == 1:
            self.metering.record(
                self.metering.end(window),
                phase="compile",
                cohort=self.spec.name,
                trial_ids=self.trial_ids,
                work=np.ones(self.k),
                kind="compile",
            )
            self._choose(w, "probe skipped: no other candidate width fits in memory", predicted_train_s=predicted)
            return
        compile_s = time.perf_counter() - t0
        self.metering.record(
            self.metering.end(window),
            phase="compile",
            cohort=self.spec.name,
            trial_ids=self.trial_ids,
            work=np.ones(self.k),
            kind="compile",
        )
        # The probe trains (and discards) a few steps per width: its energy is its own line.
        window = self.metering.begin(f"probe:{self.spec.name}")
        # Each timed call lasts ~0.2 s, predicted from the current width's measured step as if cost
        # grew with the width: long enough that dispatch and timer noise do not decide, short next to
        # the training it steers. (A fixed step count made a 6-wide call 6x longer than a 1-wide one:
        # 7 s of probing on MNIST-1D 50,000.)
        steps = {c: max(3, int(0.2 / (t_w * c / w))) for c in by_width}
        probe = self.trainer.probe_width(by_width, steps=steps, repeats=3, quick=self.quick)
        self.metering.record(
            self.metering.end(window),
            phase="probe",
            cohort=self.spec.name,
            trial_ids=self.trial_ids,
            work=np.ones(self.k),
            kind="probe",
        )
        for c, rate in probe.samples_per_second.items():  # seconds per step of a c-wide chunk
            self.step_seconds.setdefault(c, min(c, self.k) * self.spec.signature.batch_size / rate)
        self._set_width(probe.chosen)
        self._choose(
            probe.chosen,
            "fastest measured width",
            samples_per_second={str(c): r for c, r in probe.samples_per_second.items()},
            compile_seconds=compile_s,
            predicted_train_s=predicted,
        )
        self.compile()  # evaluation at the chosen width

    def narrow_for_survivors(self, planned_trial_steps: float) -> None:
        """Step 3 of the policy: a narrower program for fewer survivors, only if it pays."""
        k, w = self.k, self.width
        if self.placement.round_width(k) >= w or not self.policy.narrow:
            return
        t_w = self.step_seconds.get(w)
        if t_w is None:
            return
        steps_each = planned_trial_steps / k

        def outcome(c: int) -> tuple[float, float, float]:
            t_c = self.step_seconds.get(c, t_w * c / w)
            saving = steps_each * (num_chunks(k, w) * t_w - num_chunks(k, c) * t_c)
            cost = sum(0.0 if self._is_compiled(kind, c) else self.compile_seconds(kind) for kind in ("train", "eval"))
            return saving - cost, saving, cost

        # Exactly k rows (no padding), or a width already measured faster (e.g. 1 on a CPU).
        options = sorted({self.placement.round_width(k), *(c for c in self.step_seconds if c < w)})
        narrow = max(options, key=lambda c: (outcome(c)[0], c))
        _, saving, cost = outcome(narrow)
        if saving > cost:
            self._set_width(narrow)
            self._choose(
                narrow,
                f"narrowed for {k} survivors: predicted saving {saving:.2f} s > compile {cost:.2f} s",
                predicted_saving_s=saving,
                predicted_compile_s=cost,
            )
            self.compile()
        else:
            self.choices.append(
                {
                    "width": w,
                    "reason": f"kept for {k} survivors: predicted saving {saving:.2f} s <= compile {cost:.2f} s",
                    "predicted_saving_s": saving,
                    "predicted_compile_s": cost,
                }
            )

    # ---------------------------------------------------------------------------------- eval

    def evaluate(self, phase: str, split: str = "val") -> EvalRecord:
        """Score, metric and the score's standard error of every live trial on ``split`` in one
        ``PHASE:eval`` (``PHASE:test``) window; frozen (diverged) trials and padding rows receive no
        energy. The test split is only ever evaluated for the selected configuration."""
        self.compile()
        window = self.metering.begin(f"{phase}:{'eval' if split == 'val' else split}", after=self.chunks)
        outs = [self.trainer.evaluate(c, split) for c in self.chunks]
        reading = self.metering.end(window, outs)
        slots = self.placement.slots(self.k, self.width)
        field = lambda name: np.concatenate([getattr(o, name) for o in outs])[slots]
        self.metering.record(
            reading,
            phase=phase,
            cohort=self.spec.name,
            trial_ids=self.trial_ids,
            work=self.field("active").astype(np.float64),
            kind="eval" if split == "val" else split,
            devices=self.trial_devices(),
        )
        return EvalRecord(field("score"), field("metric"), field("score_se"))

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
