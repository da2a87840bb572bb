"""A study's energy windows, written to its ledger at the meter's resolution.

:class:`Metering` is the study's one owner of energy bookkeeping while it runs: it opens windows
around work (:meth:`Metering.window`), merges windows shorter than the meter's resolution, writes
them to the :class:`~sm2jax.energy.ledger.EnergyLedger`, and keeps the running sums the study
reads: joules per trial, phase and kind of window (:meth:`Metering.trial_joules`) and the study's
total so far over every attempt (:attr:`Metering.total_joules`). The ledger is the record; nothing
else sums window energy.

Merging. A window is written once the queued windows span at least the meter's resolution (1 s for
an NVML counter that updates every ~100 ms): shorter windows are merged with the next ones, never
turned into ``None``. A merged reading (first window's start to last window's end) is split among
its windows by their own readings (by busy seconds where one has no figure; see
:func:`merge_shares`), then among each window's trials by work, and every record says
it was merged. Each record's ``seconds`` is its share of the merged span (``busy_seconds`` its own
work's), so that net energy -- gross minus idle power times seconds -- and a phase's seconds add
up to the span's. :meth:`Metering.flush` closes the queue at a decision point, waiting out the rest of
the resolution if needed (that wait is measured and charged, and said so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from sm2jax.energy.ledger import EnergyLedger, add_known, trial_totals
from sm2jax.energy.monitor import EnergyMonitor, WindowReading
from sm2jax.interrupts import take_interrupt


@dataclasses.dataclass
class OpenWindow:
    """A window being measured (what :meth:`Metering.window` yields).

    The work inside sets what the record needs: :meth:`cover` the JAX outputs the window must block
    on, and ``work`` (per trial, default one each), ``steps``, ``batch_size`` and ``devices`` (the
    device of each trial's row). ``steps``, ``work`` and ``devices`` may be zero-argument callables,
    called in that order once the window has closed (figures read from the window's outputs). ``phase`` and ``kind`` may be changed before the window closes
    (a failed attempt is charged as ``oom-retry``). After the ``with`` block, ``reading`` holds
    the measurement.
    """

    phase: str
    kind: str
    work: Any = None  # per trial, or a callable giving it
    steps: Any = None  # per trial, or a callable giving it
    batch_size: int = 0
    devices: Any = None  # per trial, or a callable giving it
    outputs: list[Any] = dataclasses.field(default_factory=list)
    reading: WindowReading | None = None

    def cover(self, outputs: Any) -> Any:
        """Registers JAX outputs produced in this window; it blocks on them before it closes."""
        self.outputs.append(outputs)
        return outputs


def merge_shares(
    readings: Sequence[WindowReading],
    merged: WindowReading,
    update_s: float | None,
    previous_w: float | None = None,
) -> tuple[list[float], str]:
    """How a ``merged`` reading is split among the windows it merged, and how that was decided.

    A window at least one meter update long (``update_s``: 100 ms for an NVML counter) is weighted
    by its own reading, a shorter one (its reading would be mostly quantisation) or one without a
    figure by its busy seconds at the merged span's mean power. Own readings are corrected for the
    counter's lag: a counter read at ``t`` holds the energy up to its last update, on average
    ``h = update_s / 2`` earlier, so a reading ``r_i`` of a window of ``s_i`` seconds misses ``h``
    of its own power at its end and holds ``h`` of the previous window's power at its start:

        r_i = c_i - h c_i / s_i + h c_{i-1} / s_{i-1}

    solved forward for the corrected ``c_i`` (``previous_w``: the power of the window before the
    first, when known). A busy window next to an idle one is then charged its own energy, not the
    span's mean power times its seconds. Shares add up to one; the merged total is unchanged.
    """
    usable = merged.joules is not None and merged.seconds > 0 and update_s is not None
    mean_w = merged.joules / merged.seconds if usable else 0.0
    own = [
        usable and r.joules is not None and r.joules >= 0 and r.seconds >= update_s and r.seconds > 0 for r in readings
    ]
    if not any(own):
        busy = [r.seconds for r in readings]
        if sum(busy) > 0:
            return [b / sum(busy) for b in busy], "busy seconds"
        return [1 / len(readings)] * len(readings), "equal shares"
    h = update_s / 2
    weights, power = [], previous_w
    for r, mine in zip(readings, own):
        if not mine:
            c = r.seconds * mean_w
        elif power is None:
            c = r.joules
        else:
            c = max(0.0, (r.joules - h * power) / (1 - h / r.seconds))
        weights.append(c)
        power = c / r.seconds if r.seconds > 0 else mean_w
    if sum(weights) <= 0:
        return [1 / len(readings)] * len(readings), "equal shares"
    how = "each window's own reading" + ("" if all(own) else " (busy seconds where shorter than the meter's update)")
    return [w / sum(weights) for w in weights], how


class Metering:
    """Energy windows of a study written to its ledger, at the meter's resolution (see the module
    docstring).

    Args:
      monitor: the meter's begin/end windows.
      ledger: where records go.
      attempt: this run's attempt number; ``None`` counts it from the ledger (one more than the
        largest recorded: a run killed before its first phase completed left no progress record,
        but its energy is in the ledger and must stay distinguishable).
      on_window: called with each written window record.
    """

    def __init__(
        self,
        monitor: EnergyMonitor,
        ledger: EnergyLedger,
        attempt: int | None = None,
        on_window: Callable[[dict], None] | None = None,
    ):
        self.monitor = monitor
        self.ledger = ledger
        self.on_window = on_window
        self.resolution_s = monitor.resolution_s
        self._pending: list[dict[str, Any]] = []
        self._last_power: float | None = None  # the last written window's power (merge_shares)
        self._seq = 0
        self.start(attempt)

    def start(self, attempt: int | None = None) -> None:
        """Starts an attempt: its number (``None``: counted from the ledger) and the study's energy
        so far, read from the ledger (call it after the ledger was repaired)."""
        earlier = self.ledger.records()
        self.attempt = attempt if attempt is not None else max((r.get("attempt", 0) for r in earlier), default=0) + 1
        self.total_joules: float | None = 0.0
        self.methods: set[str] = set()
        self._trials: list[dict[str, Any]] = []  # this attempt's trial records, as the ledger holds them
        for r in earlier:
            if r["type"] == "window":
                self._tally(r)
        # The attempt's whole span: from this first reading to the last (:meth:`close_span`).
        self._span_start = self.monitor.sample()
        self._span_closed = False
        self._span_windows: float | None = 0.0
        self._span_window_seconds = 0.0

    def _tally(self, window: dict[str, Any]) -> None:
        self.methods.add(window["method"])
        self.total_joules = add_known(self.total_joules, window["joules"])

    def so_far_text(self) -> str:
        """The study's energy so far, every attempt included (for a progress line)."""
        if self.total_joules is None:
            return "energy unavailable"
        return f"{self.total_joules:.1f} J {','.join(sorted(self.methods)) or self.monitor.method}"

    # ---------------------------------------------------------------------------------- windows

    def _begin(self, name: str, after: Any = None):
        take_interrupt()  # a Ctrl-C whose KeyboardInterrupt was swallowed (see sm2jax.interrupts)
        return self.monitor.begin(name, after=after)

    @contextlib.contextmanager
    def window(
        self,
        name: str,
        *,
        phase: str,
        cohort: str,
        trial_ids: Sequence[int],
        kind: str = "train",
        after: Any = None,
    ) -> Iterator[OpenWindow]:
        """Measures the work of the ``with`` block as one window and queues its record.

        ``name`` labels the reading (``compile:COHORT``, ``rung-1:eval`` ...), ``phase`` and ``kind``
        (``train``, ``eval``, ``test``, ``compile``, ``probe`` or ``oom-retry``) the records. The
        window first blocks on ``after`` (work dispatched earlier must not leak into it) and, at the
        end, on the outputs the block covered (:meth:`OpenWindow.cover`). A block that raises
        records nothing: the exception propagates.
        """
        handle = self._begin(name, after=after)
        w = OpenWindow(phase, kind)
        yield w
        w.reading = self.monitor.end(handle, w.outputs or None)
        # Figures that read the window's outputs are computed after it closed, in this order.
        for field in ("steps", "work", "devices"):
            if callable(getattr(w, field)):
                setattr(w, field, getattr(w, field)())
        self._queue(
            w.reading,
            phase=w.phase,
            cohort=cohort,
            trial_ids=list(trial_ids),
            work=np.ones(len(trial_ids)) if w.work is None else w.work,
            steps=w.steps,
            batch_size=w.batch_size,
            kind=w.kind,
            devices=w.devices,
        )

    def _queue(
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
        """Queues one window's reading for its trials (``work`` >= 0 each; ``devices``: the JAX
        device each trial's row ran on, so that each device's energy goes to its own trials) and
        writes the queue once it spans the meter's resolution."""
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
        weights, split = merge_shares(
            [e["reading"] for e in entries], merged, self.monitor.meter.update_s, self._last_power
        )
        last_seconds = entries[-1]["reading"].seconds
        self._last_power = (
            merged.joules * weights[-1] / last_seconds if merged.joules is not None and last_seconds > 0 else None
        )
        busy = [e["reading"].seconds for e in entries]
        time_shares = [b / sum(busy) for b in busy] if sum(busy) > 0 else [1 / len(entries)] * len(entries)
        note = merged.note
        if len(entries) > 1 or waited > 0:
            note = (
                f"merged: {len(entries)} window(s) over {merged.seconds:.2f} s"
                + (
                    f" (waited {waited:.2f} s to reach the meter's {self.resolution_s:g} s resolution)"
                    if waited > 0
                    else ""
                )
                + f"; split by {split}"
                + (f"; {merged.note}" if merged.note else "")
            )
        for e, share, time_share in zip(entries, weights, time_shares):
            r = e["reading"]
            part = dataclasses.replace(
                r,
                joules=None if merged.joules is None else merged.joules * share,
                per_device=None if merged.per_device is None else {d: v * share for d, v in merged.per_device.items()},
                valid=merged.valid,
                note=note,
                method=merged.method,
                uncertainty=merged.uncertainty,
                # Its share of the merged wall span, which the joules cover (gaps included): net
                # energy (gross - idle watts x seconds) and phase seconds then add up to the span's.
                seconds=merged.seconds * time_share,
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
                    "busy_seconds": r.seconds,
                    "resolution_s": self.resolution_s,
                    "uncertainty": merged.uncertainty,
                },
            )
            self._trials += recs[1:]
            self._tally(recs[0])
            self._span_windows = add_known(self._span_windows, recs[0]["joules"])
            self._span_window_seconds += recs[0]["seconds"]
            if self.on_window is not None:
                self.on_window(recs[0])

    def span_so_far(self) -> tuple[WindowReading, float | None, float]:
        """This attempt's span up to now (the meter's reading since its first sample), and the
        joules and seconds of the windows written in it so far (call :meth:`flush` first)."""
        reading = self.monitor.between("span", self._span_start, self.monitor.sample())
        return reading, self._span_windows, self._span_window_seconds

    def close_span(self) -> dict[str, Any] | None:
        """Ends the attempt's whole span: the meter's reading from the attempt's first sample to
        now, split into its windows and the time between them (host work, checkpoints, Python,
        the idle baseline), so that windows + between = span; written to the ledger as a ``span``
        record and returned (``None``: already closed). Call it after :meth:`flush`: every window
        written."""
        if self._span_closed:
            return None
        self._span_closed = True
        reading = self.monitor.between("span", self._span_start, self.monitor.sample())
        return self.ledger.record_span(
            reading,
            attempt=self.attempt,
            windows_joules=self._span_windows,
            windows_seconds=self._span_window_seconds,
        )

    def trial_joules(
        self, phase: str, trial_ids: list[int], kinds: tuple[str, ...] = ("train", "eval")
    ) -> dict[int, float | None]:
        """Joules written by this attempt for each trial in ``phase`` over window ``kinds``
        (``None`` if any of its windows was unavailable): the ledger's one per-trial query
        (:func:`~sm2jax.energy.ledger.trial_totals`, which the report uses too) over the records
        this attempt wrote -- held here, because in a multi-process study only process 0 writes
        the file, and every process must decide alike. Call :meth:`flush` first."""
        mine = [r for r in self._trials if r["phase"] == phase and r["kind"] in kinds and r["trial_id"] in trial_ids]
        totals = trial_totals(mine)
        return {t: totals.get(t, 0.0) for t in trial_ids}
