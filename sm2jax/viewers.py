"""A study in the ecosystem's viewers: TensorBoard event files and an Optuna storage.

* :func:`write_tensorboard` writes ``DIR/tensorboard/trial-N/`` for every configuration (a run per
  configuration, so TensorBoard overlays them): ``train/loss`` per energy window, ``val/score`` per
  phase and ``energy/train_eval_joules`` (its training and evaluation energy so far) per phase, each
  against training samples, and its hyperparameters for the hparams plugin (:func:`run_hparams`).
  ``tensorboard --logdir DIR/tensorboard`` shows them while the study runs (rewritten after each
  phase) and after it ends.
* :func:`write_optuna` writes ``DIR/optuna.db`` (SQLite through Optuna's RDB storage; ``pip install
  'sm2jax[optuna]'``) after committed phases (``StudySpec.optuna_seconds`` apart), on a
  :class:`BackgroundWriter`'s thread, and on ``sm2jax report DIR``: every configuration as a trial with its searched parameters over their real
  distributions (:func:`optuna_distributions`), its validation score per phase as intermediate
  values, its state (running, complete when it reached the last rung, pruned at the phase it was
  dropped, failed when infeasible), its times from the ledger, and its energy, cohort, reason and
  seed replicates as attributes, for ``optuna-dashboard sqlite:///DIR/optuna.db`` and
  ``optuna.load_study``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable
from typing import Any

from sm2jax.store import OPTUNA, TENSORBOARD
from sm2jax.store.files import TEMPORARY, new_file_mode


def write_viewers(
    directory: str, results: dict[str, Any], trials: dict[str, dict[str, Any]], optuna: bool = True
) -> dict[str, str | None]:
    """Writes the TensorBoard files (its runs' ``results["hparams"]``, :func:`run_hparams`, when
    given) and with ``optuna`` the Optuna storage of a study; returns their paths. A failure here is
    a warning naming it, never a lost study."""
    out: dict[str, str | None] = {}
    hparams = results.get("hparams")
    writers = {"tensorboard": lambda: write_tensorboard(directory, results.get("curves") or {}, trials, hparams)}
    if optuna:
        writers["optuna"] = lambda: write_optuna(directory, results)
    for name, write in writers.items():
        try:
            out[name] = write()
        except Exception as err:
            warnings.warn(
                f"writing the {name} files failed ({type(err).__name__}: {err}); the study itself is intact",
                RuntimeWarning,
                stacklevel=2,
            )
            out[name] = None
    return out


def run_hparams(
    configs: dict[int, dict[str, Any]], decisions: list[dict[str, Any]], selected: int | None
) -> dict[str, dict[str, Any]]:
    """Each run's hyperparameters for TensorBoard's hparams plugin: its configuration's values (a
    mapping such as the model as JSON text), the phase it reached and whether it is the selection."""
    reached: dict[int, str] = {}
    for d in decisions:
        reached[d["trial_id"]] = d["phase"]
    return {
        str(t): {
            **{k: _param(v) for k, v in values.items()},
            "phase_reached": reached.get(t, "not decided yet"),
            "selected": t == selected,
        }
        for t, values in configs.items()
    }


class BackgroundWriter:
    """Runs one write at a time on a thread of its own (the study trains on meanwhile); a new
    request first waits for the one in flight, and :meth:`join` waits for the last. A write that
    fails is a warning at :meth:`join`, never a lost study."""

    def __init__(self, what: str):
        self.what = what
        self._thread: threading.Thread | None = None
        self._errors: list[BaseException] = []

    def submit(self, write: Callable[[], Any]) -> None:
        self.join()
        self._thread = threading.Thread(target=self._run, args=(write,), name=f"sm2jax-{self.what}")
        self._thread.start()

    def _run(self, write: Callable[[], Any]) -> None:
        try:
            write()
        except Exception as err:  # reported by join, in the study's thread
            self._errors.append(err)

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        errors, self._errors = self._errors, []
        for err in errors:
            warnings.warn(
                f"writing the {self.what} failed ({type(err).__name__}: {err}); the study itself is intact",
                RuntimeWarning,
                stacklevel=2,
            )


def write_tensorboard(
    directory: str,
    curves: dict[str, dict[str, list]],
    trials: dict[str, dict[str, Any]],
    hparams: dict[str, dict[str, Any]] | None = None,
) -> str:
    """Rewrites ``directory/tensorboard`` from a study's ``curves`` and its ``trials`` records (see
    :class:`sm2jax.phases.StudyState`), each run with its ``hparams`` (:func:`run_hparams`) for the
    hparams plugin, whose metric is the run's ``val/score``; returns the folder."""
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams as hparams_summaries

    root = os.path.join(directory, TENSORBOARD)
    shutil.rmtree(root, ignore_errors=True)  # rewritten whole: a resumed phase never doubles a point
    for key in sorted(set(curves) | set(trials), key=int):
        curve = curves.get(key, {})
        with SummaryWriter(os.path.join(root, f"trial-{int(key):04d}"), flush_secs=3600) as writer:
            for samples, loss in curve.get("train", []):
                if loss is not None:
                    writer.add_scalar("train/loss", loss, int(samples))
            for samples, score, _phase in curve.get("val", []):
                if score is not None:
                    writer.add_scalar("val/score", score, int(samples))
            for h in trials.get(key, {}).get("history", []):
                if h.get("energy_spent") is not None:
                    writer.add_scalar("energy/train_eval_joules", h["energy_spent"], int(h["samples"]))
            if hparams and key in hparams:
                scores = [v for _, v, _ in curve.get("val", []) if v is not None]
                for summary in hparams_summaries(hparams[key], {"val/score": scores[-1] if scores else float("nan")}):
                    writer.file_writer.add_summary(summary)
    return root


def _param(value: Any) -> Any:
    """A configuration value as an Optuna parameter (JSON text for a mapping such as the model)."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def _fits(dist: Any, value: Any) -> bool:
    """Whether ``dist`` holds ``value`` (a number in its range, one of its choices)."""
    try:
        return bool(dist._contains(dist.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


def sqlite_url(path: str | os.PathLike) -> str:
    """An SQLAlchemy URL of the SQLite file ``path`` that any path survives (``%``, ``?``, ``#``,
    spaces, non-ASCII: percent-encoded, which SQLAlchemy decodes back; braces too, which Optuna's
    URL template would read as fields)."""
    from sqlalchemy.engine import URL

    url = URL.create("sqlite", database=os.path.abspath(os.fspath(path))).render_as_string(hide_password=False)
    return url.replace("{", "%7B").replace("}", "%7D")


def write_optuna(directory: str, results: dict[str, Any]) -> str | None:
    """Rewrites ``directory/optuna.db`` from a study's results; ``None`` when Optuna is not installed.
    It is written whole under a temporary name and renamed: a failure leaves the previous file as it
    was, and raises (an ``OSError`` naming the path when ``optuna.db`` is a folder)."""
    try:
        with warnings.catch_warnings():  # optuna imports tqdm.auto, which warns in a notebook without ipywidgets
            warnings.filterwarnings("ignore", message="IProgress not found")
            import optuna
    except ImportError:
        return None
    path = os.path.join(directory, OPTUNA)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"{path} is a folder, not an Optuna database (move it away)", path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f"{OPTUNA}.", suffix=TEMPORARY)  # an empty SQLite database
    os.fchmod(fd, new_file_mode())
    os.close(fd)
    try:
        _fill_optuna(optuna, tmp, results)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def optuna_distributions(space: dict[str, Any] | None, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Optuna distributions of the searched hyperparameters: a float or integer range (log-scaled
    where the domain is) or the categorical choices of the space; a constant (a fixed value, one
    choice, an empty range) is no parameter. A study without its space on record gets categorical
    distributions of the values its configurations took, constants left out too."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    if space is None:
        seen: dict[str, set] = {}
        for t in rows:
            for name, value in t["config"].items():
                seen.setdefault(name, set()).add(_param(value))
        return {n: CategoricalDistribution(sorted(v, key=repr)) for n, v in seen.items() if len(v) > 1}
    for name, d in space.items():
        kind = d.get("type")
        if kind == "Categorical" and len(d["choices"]) > 1:
            out[name] = CategoricalDistribution([_param(c) for c in d["choices"]])
        elif kind in ("Uniform", "LogUniform") and d["low"] < d["high"]:
            out[name] = FloatDistribution(float(d["low"]), float(d["high"]), log=kind == "LogUniform")
        elif kind == "IntUniform" and d["low"] < d["high"]:
            out[name] = IntDistribution(int(d["low"]), int(d["high"]), log=bool(d.get("log")))
    return out


def _fill_optuna(optuna: Any, path: str, results: dict[str, Any]) -> None:
    import datetime

    from optuna.distributions import CategoricalDistribution
    from optuna.trial import FrozenTrial, TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(sqlite_url(path))
    study = optuna.create_study(storage=storage, study_name="sm2jax", direction="maximize")
    study.set_user_attr("mode", results.get("mode"))
    study.set_user_attr("energy_method", results.get("energy_method"))
    study.set_user_attr("finished", not (results.get("partial") or {}).get("phases_left"))
    every = results.get("trials", [])
    rows = [t for t in every if "replicate_of" not in t]  # a seed replicate is an attribute of its original
    replicas: dict[int, list[dict[str, Any]]] = {}
    for t in every:
        if "replicate_of" in t:
            replicas.setdefault(t["replicate_of"], []).append(
                {"trial_id": t["trial_id"], "seed": t["config"].get("seed"), "score": t["score"]}
            )
    distributions = optuna_distributions(results.get("space"), rows)
    for name, dist in list(distributions.items()):  # a value outside its range (never expected): categorical
        values = {_param(t["config"][name]) for t in rows if name in t["config"]}
        if not all(_fits(dist, v) for v in values):
            distributions[name] = CategoricalDistribution(sorted(values, key=repr))
    curves = results.get("curves") or {}
    finished = not (results.get("partial") or {}).get("phases_left")
    when = lambda t: datetime.datetime.fromtimestamp(t) if t is not None else None
    for number, t in enumerate(rows):
        intermediate = {int(s): v for s, v, _ in curves.get(str(t["trial_id"]), {}).get("val", []) if v is not None}
        if t["status"] == "infeasible":
            state = TrialState.FAIL
        elif t["status"] == "running" or (not finished and t["status"] == "finalist"):
            state = TrialState.RUNNING
        elif t["status"] in ("selected", "finalist"):
            state = TrialState.COMPLETE if t["score"] is not None else TrialState.FAIL
        else:
            state = TrialState.PRUNED
        attrs = {
            "trial_id": t["trial_id"],
            "cohort": t["cohort"],
            "status": t["status"],
            "dropped_at": t["last_phase"],
            "reason": t["reason"],
            "energy_joules": t["energy_joules"],
            "energy_method": results.get("energy_method"),
            "samples": t["samples"],
            **({"seed_replicates": replicas[t["trial_id"]]} if t["trial_id"] in replicas else {}),
        }
        start, end = when(t.get("time_start")), when(t.get("time_end"))
        study.add_trial(
            FrozenTrial(
                number=number,
                state=state,
                value=t["score"] if state == TrialState.COMPLETE else None,
                values=None,
                datetime_start=start or datetime.datetime.now(),
                datetime_complete=None if state == TrialState.RUNNING else (end or start or datetime.datetime.now()),
                params={n: _param(t["config"][n]) for n in distributions if n in t["config"]},
                distributions={n: d for n, d in distributions.items() if n in t["config"]},
                user_attrs=attrs,
                system_attrs={},
                intermediate_values=intermediate,
                trial_id=number,
            )
        )
    storage.engine.dispose()  # the file is closed before it is renamed
