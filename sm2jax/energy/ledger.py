"""Attribution of window energy to trials, and the append-only energy ledger.

Attribution. A window's measured energy :math:`E` on the devices is split among the trials that
worked in it, in proportion to their work :math:`w_k` (FLOPs per step x steps taken in the window):

.. math:: E_k = E \\cdot w_k / \\textstyle\\sum_j w_j .

Identical shapes give equal FLOPs per step, so shares follow steps; a trial frozen after diverging
takes no steps and receives nothing. The last share absorbs float rounding so that the shares sum to
the window's total exactly as stored.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from sm2jax.energy.monitor import IdleBaseline, WindowReading
from sm2jax.store.files import write_atomic

J_PER_KWH = 3.6e6
DEFAULT_INTENSITY_G_PER_KWH = 475.0
DEFAULT_INTENSITY_LABEL = f"world-average default ({DEFAULT_INTENSITY_G_PER_KWH:g} gCO2e/kWh)"


def sum_known(values: Iterable[float | None]) -> float | None:
    """The sum of ``values``, ``None`` if any is ``None`` (an incomplete sum is not a measurement)."""
    values = list(values)
    return None if any(v is None for v in values) else float(sum(values))


def add_known(a: float | None, b: float | None) -> float | None:
    """``a + b``, or ``None`` once either is unavailable: an incomplete sum is not a measurement."""
    return None if a is None or b is None else a + b


def attribute_by_device(
    per_device: dict[str, float] | None,
    total: float | None,
    work: Sequence[float],
    trial_keys: Sequence[tuple[str, ...]],
) -> tuple[list[float | None], float | None]:
    """Splits a window's energy per device: each device's joules go to the trials whose rows ran on
    it, in proportion to their work (:func:`attribute`), so a trial is charged by its own device.

    ``trial_keys[k]`` names the ``per_device`` entries trial ``k`` draws on (``("*",)``: all of
    them, a host-level meter). Trials drawing on the same keys form a group; a metered device that
    no trial worked on is unattributed. When the groups overlap (some trial draws on part of another
    group's devices) or no per-device figure exists, the total is split over all trials instead.
    """
    if total is None or per_device is None:
        return attribute(total, work)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, keys in enumerate(trial_keys):
        keys = tuple(sorted(per_device)) if keys == ("*",) else tuple(sorted(keys))
        groups.setdefault(keys, []).append(i)
    used = [k for keys in groups for k in keys]
    if len(used) != len(set(used)) or not set(used) <= set(per_device) or any(not keys for keys in groups):
        return attribute(total, work)
    shares: list[float | None] = [0.0] * len(work)
    unattributed = sum(v for k, v in per_device.items() if k not in used)
    for keys, members in groups.items():
        part, left = attribute(sum(per_device[k] for k in keys), [work[i] for i in members])
        for i, share in zip(members, part):
            shares[i] = share
        unattributed += left or 0.0
    return shares, unattributed


def attribute(total: float | None, work: Sequence[float]) -> tuple[list[float | None], float | None]:
    """Splits ``total`` in proportion to ``work``; returns ``(shares, unattributed)``.

    ``None`` (unavailable) stays ``None`` for every share. With no work at all (every trial frozen)
    nothing is attributed and the whole total is returned as unattributed.
    """
    if any(w < 0 for w in work):
        raise ValueError(f"work must be non-negative (got {list(work)})")
    if total is None:
        return [None] * len(work), None
    weight = float(sum(work))
    if weight == 0:
        return [0.0] * len(work), total
    shares = [total * w / weight for w in work]
    last = max(i for i, w in enumerate(work) if w > 0)
    shares[last] = total - sum(s for i, s in enumerate(shares) if i != last)
    return shares, 0.0


def _shares(
    reading: WindowReading,
    work: Sequence[float],
    trial_keys: Sequence[tuple[str, ...]] | None,
    net_total: float | None,
) -> tuple[list[float | None], list[float | None], float | None]:
    """A window's gross and net joules per trial, and what no trial did: by device where
    ``trial_keys`` say which device each trial drew on (:func:`attribute_by_device`), else by
    work; net follows the gross shares (each trial keeps its gross share's fraction)."""
    if trial_keys is not None:
        gross, unattributed = attribute_by_device(reading.per_device, reading.joules, work, trial_keys)
    else:
        gross, unattributed = attribute(reading.joules, work)
    if trial_keys is None or net_total is None or not reading.joules:
        net = attribute(net_total, work)[0]
    else:
        net = [None if g is None else g * net_total / reading.joules for g in gross]
    return gross, net, unattributed


class EnergyLedger:
    """Append-only JSON-lines ledger: one line per window, holding the ``window`` record and its
    ``trial`` records (``"trials"``), so that a window and its shares are written whole or not at
    all. :func:`read_ledger` gives them back as separate records.

    Each window is written and ``fsync``-ed before :meth:`record` returns, so a killed process loses
    at most the window in flight. :meth:`open` repairs the file before a run appends to it.

    Args:
      path: the ``.jsonl`` file (appended to if it exists, as when a study resumes).
      idle: the idle baseline; net energy is gross minus idle power x window seconds, split like
        the gross energy. ``None`` if the baseline is unknown.
      intensity_g_per_kwh: grid carbon intensity; its label is stored with every record.
      write: append to the file (false on the processes of a multi-process study other than 0:
        their records are computed, identically, but not written).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        idle: IdleBaseline | None = None,
        intensity_g_per_kwh: float = DEFAULT_INTENSITY_G_PER_KWH,
        intensity_label: str | None = None,
        write: bool = True,
    ):
        self.path = os.fspath(path)
        self.idle = idle
        self.intensity = intensity_g_per_kwh
        if intensity_label is None:
            intensity_label = (
                DEFAULT_INTENSITY_LABEL if intensity_g_per_kwh == DEFAULT_INTENSITY_G_PER_KWH else "user-supplied"
            )
        self.intensity_label = intensity_label
        self.write = write
        if write:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.repaired = 0
        self.damage: list[dict[str, Any]] = []

    def open(self) -> list[dict[str, Any]]:
        """Repairs the file before anything is appended (process 0 only; call it holding the study
        folder's lock): a torn last line from a kill is moved to ``PATH.torn``, and damaged lines
        elsewhere (not UTF-8, not JSON, or a window whose shares do not add up) are moved to
        ``PATH.damaged``. Returns what was damaged, each with its file, line, bytes, reason and the
        joules it held (``None``: unknown), and warns about it: nothing is dropped silently."""
        if not self.write:
            return []
        self.repaired = repair_torn_tail(self.path)
        _, self.damage = scan_ledger(self.path)
        if self.damage:
            _move_lines(self.path, [d["line"] for d in self.damage], self.path + ".damaged")
            for d in self.damage:
                joules = "unknown joules" if d["joules"] is None else f"{d['joules']:.6g} J"
                warnings.warn(
                    f"{d['file']} line {d['line']}: {d['reason']} ({d['bytes']} bytes, {joules}); moved to {os.path.basename(d['file'])}.damaged",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self.damage

    def _carbon(self, joules: float | None) -> tuple[float | None, float | None]:
        if joules is None:
            return None, None
        kwh = joules / J_PER_KWH
        return kwh, kwh * self.intensity

    def record(
        self,
        reading: WindowReading,
        *,
        phase: str,
        cohort: str,
        trial_ids: Sequence[int],
        work: Sequence[float],
        steps: Sequence[int],
        samples: Sequence[int],
        devices: Sequence[str] | None = None,
        trial_keys: Sequence[tuple[str, ...]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Attributes one window to its trials and appends the records. With ``trial_keys`` (the
        meter keys each trial's device draws on) each device's energy goes to its own trials
        (:func:`attribute_by_device`); net energy (gross minus idle) is split like the gross."""
        if not len(trial_ids) == len(work) == len(steps) == len(samples):
            raise ValueError("trial_ids, work, steps and samples must have one entry per trial")
        idle_w = self.idle.watts if self.idle is not None else None
        net_total = None if reading.joules is None or idle_w is None else reading.joules - idle_w * reading.seconds
        gross, net, unattributed = _shares(reading, work, trial_keys, net_total)
        devices = list(devices) if devices is not None else sorted(reading.per_device or [])
        base = {
            "phase": phase,
            "cohort": cohort,
            "method": reading.method,
            "valid": reading.valid,
            "devices": devices,
            "intensity_label": self.intensity_label,
            "time": time.time(),
            **(extra or {}),
        }
        kwh, g = self._carbon(reading.joules)
        host = {"host_joules": reading.host_joules, "host_method": reading.host_method} if reading.host_method else {}
        window = {
            "type": "window",
            **base,
            "window": reading.name,
            "seconds": reading.seconds,
            "joules": reading.joules,
            "net_joules": net_total,
            "per_device": reading.per_device,
            "unattributed_joules": unattributed,
            "kwh": kwh,
            "gco2e": g,
            "note": reading.note,
            "idle_watts": idle_w,
            **host,
        }
        records = [window]
        for i, (tid, j, nj, st, sa) in enumerate(zip(trial_ids, gross, net, steps, samples)):
            kwh, g = self._carbon(j)
            keys = {"device_keys": list(trial_keys[i])} if trial_keys is not None else {}
            records.append(
                {
                    "type": "trial",
                    **base,
                    "window": reading.name,
                    "trial_id": int(tid),
                    "seconds": reading.seconds,
                    "joules": j,
                    "net_joules": nj,
                    "steps": int(st),
                    "samples": int(sa),
                    "kwh": kwh,
                    "gco2e": g,
                    **keys,
                }
            )
        if not self.write:  # another process writes this study's ledger
            return records
        with open(self.path, "a") as f:
            f.write(json.dumps({**records[0], "trials": records[1:]}) + "\n")  # one line: whole or absent
            f.flush()
            os.fsync(f.fileno())
        return records

    def record_span(
        self, reading: WindowReading, *, attempt: int, windows_joules: float | None, windows_seconds: float
    ) -> dict[str, Any]:
        """Appends an attempt's whole span (:meth:`sm2jax.energy.metering.Metering.close_span`): its
        reading, the joules and seconds of its windows, and the rest -- the time between windows --
        so that ``windows_joules + between_joules == joules``. Its ``phase`` and ``kind`` are
        ``span``: no phase's, no trial's."""
        between = add_known(reading.joules, None if windows_joules is None else -windows_joules)
        kwh, g = self._carbon(reading.joules)
        record = {
            "type": "span",
            "phase": "span",
            "kind": "span",
            "attempt": attempt,
            "method": reading.method,
            "valid": reading.valid,
            "note": reading.note,
            "seconds": reading.seconds,
            "joules": reading.joules,
            "windows_joules": windows_joules,
            "windows_seconds": windows_seconds,
            "between_joules": between,
            "between_seconds": max(reading.seconds - windows_seconds, 0.0),
            "kwh": kwh,
            "gco2e": g,
            "intensity_label": self.intensity_label,
            "time": time.time(),
        }
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return record

    def records(self) -> list[dict[str, Any]]:
        """Every complete record (a torn last line from a kill is skipped)."""
        return read_ledger(self.path)


def repair_torn_tail(path: str | os.PathLike) -> int:
    """Makes a ledger end on a complete line before anything is appended.

    A process killed mid-write leaves a last line without its newline; appending to it would glue
    the next record onto it and lose both. The torn bytes are moved to ``PATH.torn`` (kept, not
    deleted) and the file is truncated after its last complete line. Returns the bytes moved.
    """
    path = os.fspath(path)
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        data = f.seek(0) or f.read()
        keep = data.rfind(b"\n") + 1
        with open(path + ".torn", "ab") as torn:
            torn.write(data[keep:] + b"\n")
            torn.flush()
            os.fsync(torn.fileno())
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return len(data) - keep


def read_ledger(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every whole record of a ledger, a window's trial records after it (damaged lines, such as a
    torn last line from a kill, are left out: :func:`scan_ledger` names them)."""
    return scan_ledger(path)[0]


def scan_ledger(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(records, damage)`` of a ledger: its whole records, and one entry per damaged line
    (``file``, 1-based ``line``, ``bytes``, ``reason``, ``joules`` it held or ``None``). A line is
    damaged when it is not UTF-8 or not a JSON record, or when it is a window whose trials' shares
    and unattributed joules do not add up to its total (written by a version that wrote a window's
    trials on lines of their own, a kill or a full disk between them). A last line without its
    newline (a torn write) is damaged too, and so is a duplicate -- a window whose ``window_id``
    (attempt and sequence number) an earlier line already holds, or a line repeated byte for byte
    (a restored backup, a bad merge): it is skipped, with the joules it would have added."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return [], []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    records: list[dict[str, Any]] = []
    damage: list[dict[str, Any]] = []
    windows: list[tuple[int, int, dict[str, Any], list | None]] = []  # (line, bytes, record, trials)
    legacy: dict[int, list[tuple[int, int, dict[str, Any]]]] = {}
    seen: dict[Any, int] = {}  # a window's identity (or a line's bytes) -> the line that holds it
    for n, raw in enumerate(lines, start=1):
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict) or record.get("type") not in ("window", "trial", "span"):
                raise ValueError("not a ledger record")
        except (UnicodeDecodeError, ValueError) as err:
            reason = (
                "torn write (no newline)"
                if n == len(lines) and not data.endswith(b"\n")
                else f"not a ledger record ({type(err).__name__})"
            )
            damage.append({"file": path, "line": n, "bytes": len(raw), "reason": reason, "joules": None})
            continue
        first = _first_copy(seen, n, raw, record)
        if first is not None:
            joules = record.get("joules") if record["type"] == "window" else 0.0
            what = f"window {record['window_id']}" if "window_id" in record else "the same bytes"
            reason = f"duplicate of line {first} ({what}): counted once"
            damage.append({"file": path, "line": n, "bytes": len(raw), "reason": reason, "joules": joules})
            continue
        trials = record.pop("trials", None)
        if record["type"] == "window":
            windows.append((n, len(raw), record, trials))
        elif windows:  # a trial record on a line of its own, after its window (an earlier version's)
            legacy.setdefault(len(windows) - 1, []).append((n, len(raw), record))
        records.append(record)
        records.extend(trials or [])
    for i, (n, size, w, trials) in enumerate(windows):
        own = [] if trials is not None else legacy.get(i, [])
        shares = [t.get("joules") for t in (trials if trials is not None else [t for _, _, t in own])]
        if w.get("joules") is None or any(j is None for j in shares):
            continue
        attributed = sum(shares) + (w.get("unattributed_joules") or 0.0)
        if abs(attributed - w["joules"]) <= 1e-6 * max(1.0, abs(w["joules"])):
            continue
        reason = f"window {w.get('window_id')}: its trials' shares add up to {attributed:.6g} J of {w['joules']:.6g} J"
        damage.append({"file": path, "line": n, "bytes": size, "reason": reason, "joules": w["joules"]})
        for m, tsize, _ in own:  # its trial lines go with it
            share = f"a trial share of window {w.get('window_id')}"
            damage.append({"file": path, "line": m, "bytes": tsize, "reason": share, "joules": 0.0})
        dropped = {id(w), *(id(t) for t in trials or []), *(id(t) for _, _, t in own)}
        records = [r for r in records if id(r) not in dropped]
    damage.sort(key=lambda d: d["line"])
    return records, damage


def _first_copy(seen: dict[Any, int], line: int, raw: bytes, record: dict[str, Any]) -> int | None:
    """The earlier line that ``record`` (line ``line``, bytes ``raw``) duplicates, else ``None``
    (and it is remembered): the same ``window_id`` for a window, or the same bytes for any line."""
    keys = [("bytes", raw)]
    if record["type"] == "window" and "window_id" in record:
        keys.append(("window", record["window_id"]))
    for key in keys:
        if key in seen:
            return seen[key]
    for key in keys:
        seen[key] = line
    return None


def _move_lines(path: str, numbers: list[int], to: str) -> None:
    """Moves the given 1-based lines of ``path`` to the end of ``to`` (both kept), atomically."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    drop = set(numbers)
    moved = [line for i, line in enumerate(lines, start=1) if i in drop]
    kept = [line for i, line in enumerate(lines, start=1) if i not in drop]
    with open(to, "ab") as f:
        f.write(b"".join(line + b"\n" for line in moved))
        f.flush()
        os.fsync(f.fileno())
    write_atomic(path, b"\n".join(kept))


def whole_span(records: Sequence[dict[str, Any]], attempts: int, running: int | None = None) -> dict[str, Any] | None:
    """A study's whole span from its attempts' ``span`` records: the meter's joules from each
    attempt's first reading to its last, its windows and the time between them (windows + between
    = span), kWh and gCO2e; ``None`` joules where any attempt's span is unavailable or missing (a
    killed attempt leaves none: ``missing`` lists them; the ``running`` attempt records its own
    when it ends). ``None`` when no attempt recorded one."""
    spans = [r for r in records if r["type"] == "span"]
    if not spans:
        return None
    out: dict[str, Any] = {"attempts": len(spans), "methods": sorted({r["method"] for r in spans})}
    for field in ("joules", "windows_joules", "between_joules", "kwh", "gco2e"):
        total: float | None = 0.0
        for r in spans:
            total = add_known(total, r.get(field))
        out[field] = total
    out["seconds"] = sum(r["seconds"] for r in spans)
    out["between_seconds"] = sum(r["between_seconds"] for r in spans)
    out["missing"] = sorted(set(range(1, attempts + 1)) - {r["attempt"] for r in spans} - {running})
    out["running"] = running
    if out["missing"] or running is not None:  # a killed attempt's span is unknown: no whole-span figure
        for field in ("joules", "between_joules", "kwh", "gco2e"):
            out[field] = None
    return out


def summarize(records: Sequence[dict[str, Any]], key: str = "phase") -> dict[str, dict[str, Any]]:
    """Totals of ``window`` records grouped by ``key`` (joules, net joules, kWh, gCO2e, seconds); a
    group with any unavailable window reports ``None`` for it (an incomplete sum is not a
    measurement). Methods are listed, never merged."""
    groups: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["type"] != "window":
            continue
        g = groups.setdefault(
            str(r[key]),
            {
                "joules": 0.0,
                "net_joules": 0.0,
                "kwh": 0.0,
                "gco2e": 0.0,
                "seconds": 0.0,
                "methods": set(),
                "windows": 0,
            },
        )
        if "host_method" in r:  # the accelerator is unmetered: the host's figure, on its own line
            g["host_method"] = r["host_method"]
            g["host_joules"] = add_known(g.get("host_joules", 0.0), r["host_joules"])
        g["windows"] += 1
        g["seconds"] += r["seconds"]
        g["methods"].add(r["method"])
        for field in ("joules", "net_joules", "kwh", "gco2e"):
            g[field] = add_known(g[field], r.get(field))
    for g in groups.values():
        g["methods"] = sorted(g["methods"])
    return groups


def trial_totals(
    records: Sequence[dict[str, Any]], phases: Sequence[str] | None = None, field: str = "joules"
) -> dict[int, float | None]:
    """Per trial, the sum of ``field`` (gross ``joules``, ``kwh`` or ``gco2e``) over the given phases
    (all if ``None``); ``None`` if any was unavailable."""
    totals: dict[int, float | None] = {}
    for r in records:
        if r["type"] != "trial" or (phases is not None and r["phase"] not in phases):
            continue
        totals[r["trial_id"]] = add_known(totals.get(r["trial_id"], 0.0), r.get(field))
    return totals
