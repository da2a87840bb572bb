"""``sm2jax report``'s files: CSV tables and PNG figures, ``optuna.db`` and a TensorBoard copy, each
written whole or named in one line while the rest are written."""

from __future__ import annotations

import os
import shlex
import sys


def write_report_files(results: dict, args) -> int:
    """``report``'s files: tables and figures in ``--out`` (default ``DIR/report``), and for a finished
    study ``optuna.db`` (in ``--out`` when given, else ``DIR``) and, with ``--out``, the TensorBoard
    runs. Each file that cannot be written is one line saying so, and the rest are still written;
    exit 2 if any was not."""
    from sm2jax.report import load_results
    from sm2jax.store.folder import StudyDir

    folder = StudyDir(args.dir)
    out = args.out or folder.report_path
    if folder.bracket_run():  # the earlier Hyperband layout: each bracket's files in out/bracket-S
        failed = 0
        for b in results["brackets"]:
            failed += _write_files(load_results(folder.bracket(b["s"])), os.path.join(out, f"bracket-{b['s']}"))
        return 2 if failed else 0
    failed = _write_files(results, out)
    if not results.get("partial"):
        failed += _write_viewer_files(results, folder, args.out)
    return 2 if failed else 0


def _not_written(what: str, path: str, err: BaseException) -> None:
    reason = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
    reason = str(reason).splitlines()[0][:300]
    print(
        f"sm2jax: error: {what} not written ({path}): {reason} (the rest is written; choose another folder with --out)",
        file=sys.stderr,
    )


def _write_each(writers: list) -> tuple[list[str], int]:
    """Runs each ``(path, write)``; returns the paths written and how many failed (each said in one line)."""
    written, failed = [], 0
    for path, write in writers:
        try:
            write()
            written.append(path)
        except Exception as err:
            _not_written(os.path.basename(path), path, err)
            failed += 1
    return written, failed


def _write_files(results: dict, out: str) -> int:
    """The tables and figures of ``results`` in ``out``; returns how many could not be written."""
    from sm2jax.figures import plot_writers, table_writers

    if "trials" not in results:
        print(
            f"sm2jax: {results['study']}/results.json predates per-configuration tables: `sm2jax resume {results['study']}` rewrites it (nothing retrains)",
            file=sys.stderr,
        )
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        _not_written("the tables and figures", out, err)
        return 1
    writers = table_writers(results, out)
    try:
        writers += plot_writers(results, out)
    except ImportError as err:
        print(f"sm2jax: {err}", file=sys.stderr)
    written, failed = _write_each(writers)
    if written:
        print(f"wrote {', '.join(os.path.basename(p) for p in written)} to {out}", file=sys.stderr)
    return failed


def _write_viewer_files(results: dict, folder, out: str | None) -> int:
    """``optuna.db`` (in ``out`` when given, else the study folder) and, with ``out``, a TensorBoard
    copy there; returns how many could not be written."""
    from sm2jax.phases import StudyState
    from sm2jax.store import OPTUNA, TENSORBOARD
    from sm2jax.viewers import run_hparams, sqlite_url, write_optuna, write_tensorboard

    where = out or folder.path
    db = os.path.join(where, OPTUNA)
    written: list = []
    # The study rewrites its own after every phase; this one is from results.json (or goes to --out).
    _, failed = _write_each([(db, lambda: written.append(write_optuna(where, results)))])
    if written and written[0]:
        print(f"wrote {db} (optuna-dashboard {shlex.quote(sqlite_url(db))})", file=sys.stderr)
    elif not failed:
        print("no optuna.db: pip install 'sm2jax[optuna]'", file=sys.stderr)
    if out is not None:  # the study writes its own TensorBoard runs; --out gets a copy of everything
        saved = folder.saved_phases()
        trials = StudyState.from_json(folder.load_progress(saved[-1])).trials if saved else {}
        configs = {t["trial_id"]: t["config"] for t in results.get("trials", [])}
        hparams = run_hparams(configs, results.get("decisions", []), (results.get("selected") or {}).get("trial_id"))
        board = lambda: write_tensorboard(out, results.get("curves") or {}, trials, hparams)
        done, lost = _write_each([(os.path.join(out, TENSORBOARD), board)])
        failed += lost
        if done:
            print(f"wrote {done[0]} (tensorboard --logdir)", file=sys.stderr)
    return failed
