"""A study in the ecosystem's viewers: TensorBoard event files and an Optuna storage.

* :func:`write_tensorboard` writes ``DIR/tensorboard/trial-N/`` for every configuration (a run per
  configuration, so TensorBoard overlays them): ``train/loss`` per energy window, ``val/score`` per
  phase and ``energy/train_eval_joules`` (its training and evaluation energy so far) per phase, each against training samples.
  ``tensorboard --logdir DIR/tensorboard`` shows them while the study runs (rewritten after each
  phase) and after it ends.
* :func:`write_optuna` writes ``DIR/optuna.db`` (SQLite through Optuna's RDB storage; ``pip install
  'sm2jax[optuna]'``; ``sm2jax report DIR`` writes it, as setting up the storage takes about a second): every configuration as a trial with its parameters, its validation score per
  phase as intermediate values, its state (complete when it reached the last rung, pruned at the
  phase it was dropped, failed when infeasible) and its energy, cohort and reason as attributes, for
  ``optuna-dashboard sqlite:///DIR/optuna.db`` and ``optuna.load_study``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import warnings
from typing import Any

from sm2jax.files import TEMPORARY, new_file_mode

TENSORBOARD = "tensorboard"
OPTUNA = "optuna.db"


def write_viewers(
    directory: str, results: dict[str, Any], trials: dict[str, dict[str, Any]], optuna: bool = True
) -> dict[str, str | None]:
    """Writes the TensorBoard files (and with ``optuna`` the Optuna storage) of a study; returns
    their paths. A failure here is a warning naming it, never a lost study."""
    out: dict[str, str | None] = {}
    writers = {"tensorboard": lambda: write_tensorboard(directory, results.get("curves") or {}, trials)}
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


def write_tensorboard(directory: str, curves: dict[str, dict[str, list]], trials: dict[str, dict[str, Any]]) -> str:
    """Rewrites ``directory/tensorboard`` from a study's ``curves`` and its ``trials`` records (see
    :class:`sm2jax.phases.StudyState`); returns the folder."""
    from tensorboardX import SummaryWriter

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
    return root


def _param(value: Any) -> Any:
    """A configuration value as an Optuna parameter (JSON text for a mapping such as the model)."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


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


def _fill_optuna(optuna: Any, path: str, results: dict[str, Any]) -> None:
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(sqlite_url(path))
    study = optuna.create_study(storage=storage, study_name="sm2jax", direction="maximize")
    study.set_user_attr("mode", results.get("mode"))
    study.set_user_attr("energy_method", results.get("energy_method"))
    rows = results.get("trials", [])
    choices: dict[str, set] = {}
    for t in rows:
        for name, value in t["config"].items():
            choices.setdefault(name, set()).add(_param(value))
    distributions = {name: CategoricalDistribution(sorted(v, key=repr)) for name, v in choices.items()}
    curves = results.get("curves") or {}
    rungs = sorted(
        {d["phase"] for d in results.get("decisions", []) if d["phase"].startswith("rung-")}, key=lambda p: int(p[5:])
    )
    for t in rows:
        intermediate = {int(s): v for s, v, _ in curves.get(str(t["trial_id"]), {}).get("val", []) if v is not None}
        reached = bool(rungs) and t["last_phase"] == rungs[-1]  # trained its full budget
        state = (
            TrialState.FAIL if t["status"] == "infeasible" else TrialState.COMPLETE if reached else TrialState.PRUNED
        )
        attrs = {
            "trial_id": t["trial_id"],
            "cohort": t["cohort"],
            "status": t["status"],
            "dropped_at": t["last_phase"],
            "reason": t["reason"],
            "energy_joules": t["energy_joules"],
            "energy_method": results.get("energy_method"),
            "samples": t["samples"],
        }
        study.add_trial(
            optuna.trial.create_trial(
                params={name: _param(v) for name, v in t["config"].items()},
                distributions=distributions,
                value=t["score"] if state == TrialState.COMPLETE and t["score"] is not None else None,
                intermediate_values=intermediate,
                state=state if state != TrialState.COMPLETE or t["score"] is not None else TrialState.FAIL,
                user_attrs=attrs,
            )
        )
    storage.engine.dispose()  # the file is closed before it is renamed
