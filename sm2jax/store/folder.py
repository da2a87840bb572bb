"""The study folder: its layout, claiming it, atomic writes, and committing a phase.

:class:`StudyDir` is the one place that knows where a study keeps what::

    spec.json              what to run (written once; ``{"hyperband": spec}``: the earlier Hyperband layout)
    spec.sealed.json       the spec as the study trained it, with its SHA-256: a resume whose
                           spec.json was edited since is refused naming the fields
    hardware.json          devices, power limits, idle baseline, energy method
    ledger.jsonl           energy per window and per trial (append-only, fsync-ed)
    progress/phase-P.json  the study's state after phase P (atomic rename)
    checkpoints/P/         Orbax: every surviving cohort after phase P, survivors already gathered
    proposals.json         what the study's searcher proposed (never proposed again)
    plan.json              the plan made before it ran (``sm2jax plan``, or a capped run)
    results.json           the outcome
    report/                ``sm2jax report``'s tables and figures
    tensorboard/           the study's TensorBoard runs (:data:`sm2jax.store.TENSORBOARD`)
    optuna.db              its Optuna storage, for optuna-dashboard (:data:`sm2jax.store.OPTUNA`)
    bracket-S/             a Hyperband run of the earlier layout: bracket S's study (a folder of its
                           own; a Hyperband run is one study now, its brackets its rounds)

A phase is committed in one order (:meth:`StudyDir.commit_phase`): the survivors' checkpoint is
saved and waited for, then ``progress/phase-P.json`` is renamed into place. A kill at any moment
leaves either both or a checkpoint without its progress record, which a resume discards
(:meth:`StudyDir.discard_after`), so a resumed study repeats at most the phase in flight.

In a multi-process study only process 0 writes (:func:`sm2jax.distributed.is_primary`); Orbax
coordinates the checkpoints itself.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import re
import socket
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sm2jax.distributed import is_primary
from sm2jax.store.checkpoint import StudyCheckpoints
from sm2jax.store.files import TEMPORARY, write_atomic


class FolderInUse(OSError):
    """Another process is running or resuming the study in this folder."""


SEAL_EXEMPT = ("imports", "max_configurations", "optuna_seconds", "max_energy_joules", "max_wall_seconds")
"""Spec fields that change nothing a study trains (modules to import, the size limit, how often the
Optuna storage is rewritten, the energy and wall-time caps: a raised budget continues a study):
left out of the seal, so changing them is never "an edited spec"."""


def _sealed_fields(blob: dict[str, Any]) -> dict[str, Any]:
    if "hyperband" in blob and isinstance(blob["hyperband"], dict):
        return {**blob, "hyperband": _sealed_fields(blob["hyperband"])}
    return {k: v for k, v in blob.items() if k not in SEAL_EXEMPT}


def _canonical(blob: Any) -> str:
    return json.dumps(blob, sort_keys=True, default=json_default)


def _digest(blob: Any) -> str:
    return hashlib.sha256(_canonical(blob).encode()).hexdigest()


def spec_digest(blob: dict[str, Any]) -> str:
    """The SHA-256 of what a spec trains (its fields but :data:`SEAL_EXEMPT`): a plan made for it
    is for the same study exactly when the digests agree."""
    return _digest(_sealed_fields(json.loads(json.dumps(blob, default=json_default))))


def differing_fields(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names where two JSON blobs differ (``space.learning_rate.high``), sorted."""
    if isinstance(a, dict) and isinstance(b, dict):
        names = []
        for k in sorted({*a, *b}):
            if a.get(k) != b.get(k):
                names += differing_fields(a.get(k), b.get(k), f"{prefix}{k}.") if k in a and k in b else [prefix + k]
        return names
    return [] if a == b else [prefix.rstrip(".")]


def json_default(value: Any) -> Any:
    """JSON for numpy scalars and arrays (what study records hold besides plain Python values)."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def write_json(path: str | os.PathLike, blob: Any) -> None:
    """Writes ``blob`` to ``path`` atomically (:func:`sm2jax.store.files.write_atomic`); only process 0
    of a multi-process study writes."""
    if not is_primary():
        return
    path = os.fspath(path)
    text = json.dumps(blob, indent=1, default=json_default)  # a value that cannot be written fails here
    write_atomic(path, text.encode())


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; a file that is not valid JSON raises a ``ValueError`` naming it."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{os.fspath(path)} is not valid JSON ({err})") from None


def _os_reason(err: Exception) -> str:
    """The operating system's reason inside an error (Orbax and TensorStore wrap it in text)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    code = re.search(r"os_error_code='?(\d+)", str(err))
    return os.strerror(int(code.group(1))) if code else f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"


def _normalised(
    blob: dict[str, Any] | None, normalise: Callable[[dict[str, Any]], dict[str, Any]] | None
) -> dict[str, Any] | None:
    """``blob`` in this version's form (``normalise``), as JSON reads it back; as it is where it
    cannot be normalised (unknown fields or values, or a normaliser of another kind of run)."""
    if blob is None or normalise is None:
        return blob
    try:
        return json.loads(json.dumps(normalise(blob), default=json_default))
    except (KeyError, TypeError, ValueError):
        return blob


def _has_content(path: str) -> bool:
    if os.path.isdir(path):
        return bool(os.listdir(path))
    return os.path.getsize(path) > 0


class StudyDir:
    """A study's folder (see the module docstring for its layout).

    Args:
      path: the folder (need not exist yet; :meth:`claim` creates it).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    # ---------------------------------------------------------------------------------- layout

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def exists(self, name: str) -> bool:
        return os.path.exists(self.file(name))

    @property
    def spec_path(self) -> str:
        return self.file("spec.json")

    @property
    def seal_path(self) -> str:
        return self.file("spec.sealed.json")

    @property
    def hardware_path(self) -> str:
        return self.file("hardware.json")

    @property
    def ledger_path(self) -> str:
        return self.file("ledger.jsonl")

    @property
    def results_path(self) -> str:
        return self.file("results.json")

    @property
    def report_path(self) -> str:
        return self.file("report")

    @property
    def proposals_path(self) -> str:
        return self.file("proposals.json")

    def read_proposals(self) -> dict[str, Any] | None:
        """What the study's searcher proposed (``configs``: each configuration's JSON, replicates
        included; ``replicate_of``), ``None`` for a study from before proposals were kept."""
        return read_json(self.proposals_path) if os.path.exists(self.proposals_path) else None

    def write_proposals(self, blob: dict[str, Any]) -> None:
        write_json(self.proposals_path, blob)

    @property
    def plan_path(self) -> str:
        return self.file("plan.json")

    def read_plan(self, spec_blob: dict[str, Any]) -> dict[str, Any] | None:
        """The plan made before the study started (``sm2jax plan``, or a capped run) for the spec
        ``spec_blob`` (:func:`spec_digest`); ``None`` when there is none, it was made for another
        spec, or it cannot be read (a prediction: never needed to resume)."""
        try:
            plan = read_json(self.plan_path) if os.path.exists(self.plan_path) else None
        except (OSError, ValueError):
            return None
        ok = isinstance(plan, dict) and plan.get("spec_digest") == spec_digest(spec_blob)
        return plan if ok else None

    def write_plan(self, blob: dict[str, Any]) -> None:
        os.makedirs(self.path, exist_ok=True)
        write_json(self.plan_path, blob)

    def progress_path(self, phase: int) -> str:
        return os.path.join(self.path, "progress", f"phase-{phase}.json")

    def bracket(self, s: int) -> StudyDir:
        """The folder of bracket ``s`` of a Hyperband run of the earlier layout (:meth:`bracket_run`)."""
        return StudyDir(self.file(f"bracket-{s}"))

    def bracket_run(self) -> bool:
        """Whether the folder holds a Hyperband run of the layout before brackets were a study's
        rounds: ``spec.json`` is ``{"hyperband": spec}`` and each bracket is a study of its own in
        ``bracket-S/`` (read and resumed as such: :mod:`sm2jax.hyperband`)."""
        blob = self.spec_blob() if os.path.exists(self.spec_path) else None
        return isinstance(blob, dict) and "hyperband" in blob

    @contextlib.contextmanager
    def lock(self):
        """Holds the folder for one run or resume (process 0 of a multi-process study holds it for
        all): a second run or resume on the folder is refused in one line naming the holder's pid
        and host. The lock is the operating system's (``flock`` on ``lock``): a killed process
        holds nothing, so its lock is taken over at once and safely."""
        if not is_primary():
            yield
            return
        os.makedirs(self.path, exist_ok=True)
        fd = os.open(self.file("lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = os.read(fd, 4096).decode(errors="replace")
                try:
                    holder = json.loads(held)
                    who = f"pid {holder['pid']} on {holder['host']} (since {holder['since']})"
                except (ValueError, KeyError, TypeError):
                    who = "another process"
                raise FolderInUse(
                    f"{self.path} is in use by {who}: wait for that run to finish (or stop it), then `sm2jax resume {self.path}`"
                ) from None
            since = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode(), 0)
            os.fsync(fd)
            yield
        finally:
            os.close(fd)  # releases the lock

    def holder(self) -> dict[str, Any] | None:
        """Who holds the folder now (``{"pid", "host", "since"}``), or ``None`` when no run does."""
        if not self.exists("lock"):
            return None
        fd = os.open(self.file("lock"), os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    return json.loads(os.read(fd, 4096).decode(errors="replace"))
                except ValueError:
                    return {"pid": "?", "host": "?", "since": "?"}
            return None
        finally:
            os.close(fd)

    def remove_temporaries(self) -> list[str]:
        """Removes the temporary files of atomic writes that a kill left behind (call it holding
        the lock: no live writer is using them). Returns their paths."""
        gone = []
        for folder in (self.path, self.file("progress")):
            names = os.listdir(folder) if os.path.isdir(folder) else []
            for name in names:
                if name.endswith(TEMPORARY) and os.path.isfile(os.path.join(folder, name)):
                    os.remove(os.path.join(folder, name))
                    gone.append(os.path.join(folder, name))
        return gone

    def checkpoints(self) -> StudyCheckpoints:
        """The Orbax checkpoints of the surviving cohorts (close it when done)."""
        return StudyCheckpoints(self.file("checkpoints"))

    # ---------------------------------------------------------------------------------- reading

    def spec_blob(self) -> dict[str, Any] | None:
        """The stored spec as JSON (``None`` when there is none)."""
        return read_json(self.spec_path) if os.path.exists(self.spec_path) else None

    def has_run(self) -> bool:
        """Whether the study (or Hyperband run) here has measured or trained anything."""
        if not os.path.isdir(self.path):
            return False
        names = os.listdir(self.path)
        # Empty files and folders (a first start that failed before measuring anything) do not count.
        return any(
            _has_content(self.file(n))
            for n in names
            if n in ("progress", "ledger.jsonl", "results.json", "checkpoints")
        ) or any(n.startswith("bracket-") and StudyDir(self.file(n)).has_run() for n in names)

    def saved_phases(self) -> list[int]:
        """Phases with a progress record, in order."""
        folder = self.file("progress")
        names = os.listdir(folder) if os.path.isdir(folder) else []
        return sorted(int(n[6:-5]) for n in names if n.startswith("phase-") and n.endswith(".json"))

    def load_progress(self, phase: int) -> dict[str, Any]:
        return read_json(self.progress_path(phase))

    def results(self) -> dict[str, Any]:
        """The study's ``results.json``, with one-line errors for a missing study or result."""
        if not os.path.exists(self.results_path):
            if self.spec_blob() is None:
                raise FileNotFoundError(f"no study in {self.path} (spec.json missing)")
            raise FileNotFoundError(
                f"{self.results_path} does not exist: the study has not finished (run `sm2jax resume {self.path}`)"
            )
        return read_json(self.results_path)

    def read_hardware(self) -> dict[str, Any]:
        return read_json(self.hardware_path)

    # ---------------------------------------------------------------------------------- writing

    def claim(
        self, spec_blob: dict[str, Any], normalise: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    ) -> None:
        """Writes ``spec_blob`` as ``spec.json`` unless the folder holds a different study that has
        already run (then raises; no study data is ever overwritten). A spec whose study never ran
        -- a first start that failed on bad input -- is replaced by the corrected one, and so is one
        that differs only in what trains nothing (:data:`SEAL_EXEMPT`: a module to import, found
        by ``--import``, is recorded for the next resume).

        ``normalise`` maps a stored spec to its current form (a spec written by an earlier version
        lacks fields added since: their defaults apply); it may raise ``TypeError`` or
        ``ValueError``, and the stored spec is then compared as it is.
        """
        wanted = json.loads(json.dumps(spec_blob, default=json_default))
        held = self.spec_blob()
        ran = held is not None and self.has_run()
        if ran:
            self.check_seal(held, normalise)  # an edited spec.json is never believed
        held = _normalised(held, normalise)
        if ran and not os.path.exists(self.seal_path):  # a study from before seals: sealed as it stands
            self._write_seal(held)
        # Compared as they run: a field the study's scheduler ignores may be written either way.
        as_run = _normalised(wanted, normalise) if held is not None else wanted
        if held == as_run:
            if not ran:  # (re)sealed until it has trained something
                self._write_seal(wanted)
            return
        if ran and _sealed_fields(held) == _sealed_fields(as_run):  # e.g. --import names a module: recorded
            write_json(self.spec_path, spec_blob)
            return
        if ran:
            kind = "a Hyperband run" if "hyperband" in held else "a study"
            differ = sorted(k for k in {*held, *as_run} if held.get(k) != as_run.get(k))
            raise ValueError(
                f"{self.path} already holds {kind} with a different spec (differs in: {', '.join(differ)}); resume it (`sm2jax resume {self.path}`) or choose another directory"
            )
        os.makedirs(self.file("progress"), exist_ok=True)
        self._write_seal(wanted)
        write_json(self.spec_path, spec_blob)

    def grow(
        self, spec_blob: dict[str, Any], normalise: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    ) -> None:
        """Records a study's growth (``sm2jax extend``): ``spec_blob`` must be the study's spec with
        rounds appended to its ``extensions`` and nothing else changed; it becomes ``spec.json`` and
        its seal. Anything else is one line, and nothing is written."""
        held = self.spec_blob()
        if held is None or "hyperband" in held:
            what = "no study" if held is None else "a Hyperband run, not a single study"
            raise ValueError(f"{self.path} holds {what}: extend a study folder (start one with `sm2jax run --dir DIR`)")
        self.check_seal(held, normalise)
        before, after = (
            _normalised(held, normalise),
            _normalised(json.loads(json.dumps(spec_blob, default=json_default)), normalise),
        )
        old, new = before.get("extensions", []), after.get("extensions", [])
        others = sorted(k for k in {*before, *after} - {"extensions", *SEAL_EXEMPT} if before.get(k) != after.get(k))
        if others or new[: len(old)] != old or len(new) <= len(old):
            raise ValueError(
                f"{self.path}: an extension appends rounds and changes nothing else (differs in: {', '.join(others) or 'extensions'})"
            )
        self._write_seal(spec_blob)
        write_json(self.spec_path, spec_blob)

    def _write_seal(self, blob: dict[str, Any]) -> None:
        sealed = _sealed_fields(blob)
        write_json(self.seal_path, {"sha256": _digest(sealed), "spec": sealed})

    def check_seal(
        self, held: dict[str, Any], normalise: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    ) -> None:
        """Raises one line naming the fields when ``held`` (``spec.json`` as read) differs from the
        spec the study trained with (``spec.sealed.json``) in anything but :data:`SEAL_EXEMPT`. A
        study that has not trained anything is not checked, nor one from before seals (what it
        trained with cannot be known; :meth:`claim` seals its spec as it stands). Reads only."""
        if not self.has_run() or not os.path.exists(self.seal_path):
            return
        seal = read_json(self.seal_path)
        sealed = seal.get("spec") if isinstance(seal, dict) else None
        if not isinstance(sealed, dict) or seal.get("sha256") != _digest(sealed):
            raise ValueError(
                f"{self.seal_path} was edited or is damaged (its digest does not match): restore it, or delete it to accept {self.spec_path} as the spec the study trained with"
            )
        exempt = {k: held[k] for k in SEAL_EXEMPT if k in held}  # so that both normalise alike
        now = _sealed_fields(_normalised(held, normalise))
        differ = differing_fields(_sealed_fields(_normalised({**sealed, **exempt}, normalise)), now)
        if differ:
            raise ValueError(
                f"{self.spec_path} was edited after the study trained with it (differs in: {', '.join(differ)}); put back the values recorded in {os.path.basename(self.seal_path)}, or run the new values in another directory"
            )

    def write_hardware(self, blob: dict[str, Any]) -> None:
        write_json(self.hardware_path, blob)

    def write_results(self, blob: dict[str, Any]) -> None:
        write_json(self.results_path, blob)

    def commit_phase(
        self,
        phase: int,
        progress: dict[str, Any],
        checkpoints: StudyCheckpoints,
        rows: dict[str, Any],
        keep: Sequence[int] = (),
    ) -> None:
        """Records phase ``phase`` as done: the survivors' ``rows`` (cohort name -> host rows) are
        checkpointed and committed first, then the progress record is renamed into place; older
        checkpoints but the newest few and those of the phases in ``keep`` are then deleted."""
        if rows:  # Orbax refuses an empty tree; a phase with no survivor needs no checkpoint
            try:
                checkpoints.save(phase, rows)
                checkpoints.wait()  # committed before the phase is recorded as done
            except Exception as err:
                why = _os_reason(err)
                raise OSError(
                    f"cannot write the checkpoint of phase {phase} in {checkpoints.directory} ({why}); free some space, then `sm2jax resume {self.path}` (finished phases are kept)"
                ) from err
        write_json(self.progress_path(phase), progress)
        checkpoints.prune(keep)  # (every process, as Orbax's own retention did)

    def discard_after(self, phase: int, checkpoints: StudyCheckpoints) -> None:
        """Removes what a resumed study cannot trust after ``phase`` (the last one it restored):
        checkpoints of later phases (a kill between a checkpoint and its progress record, or a
        corrupt one), with a warning when one had no progress record, and later progress records."""
        saved = self.saved_phases()
        for step in checkpoints.discard_after(phase):
            if step not in saved:
                warnings.warn(
                    f"checkpoint of phase {step} has no progress record (killed between the two); discarded, the phase runs again",
                    RuntimeWarning,
                    stacklevel=3,
                )
        for stale in (p for p in saved if p > phase and is_primary()):
            os.remove(self.progress_path(stale))
