"""Trust nothing on disk: an edited spec, a duplicated ledger window, huge counts, ``report`` under
faults (read-only study, full disk, ``optuna.db`` a folder), odd paths, and errors that say where.

Every case runs on a real study folder, most through real processes: the JSON is edited by hand, a
ledger line is copied, the folder is made read-only, a write limit stands in for a full disk."""

import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import sm2jax
import sm2jax.hyperband
import sm2jax.study
from sm2jax.cli import main
from sm2jax.cohort import CohortError
from sm2jax.energy.ledger import scan_ledger
from sm2jax.space import LogUniform, SearchSpace
from sm2jax.spec import StudySpec
from sm2jax.store.folder import StudyDir
from sm2jax.viewers import sqlite_url

QUICK = ["--quick", "--no-progress", "--idle-seconds", "0"]
ODD = "100% run?v=2 #ü {x}"  # every character a URL or a format template reads as syntax
REPORT_FILES = [
    "trials.csv",
    "decisions.csv",
    "energy.csv",
    "score_vs_energy.png",
    "survival.png",
    "energy_by_phase.png",
]


def _cli(*args, env=None, prefix=(), cwd=None, limit=None):
    """``sm2jax ARGS`` in a process of its own (``limit``: RLIMIT_FSIZE bytes, as a full disk fails writes)."""
    code = "import runpy, sys; sys.argv[0] = 'sm2jax'; runpy.run_module('sm2jax.cli', run_name='__main__')"
    if limit is not None:  # the child limits itself (no fork hook in this multithreaded process)
        code = (
            "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
            f" resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); " + code
        )
    env = {**os.environ, **(env or {})}
    cmd = [*prefix, sys.executable, "-c", code, *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)


def _one_line(err: str, *words) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err[-3000:]
    for w in words:
        assert w in err, err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A quick SM2 study, finished, in a folder whose name is every kind of URL syntax."""
    directory = tmp_path_factory.mktemp("odd") / ODD
    assert main(["run", *QUICK, "--dir", str(directory)]) == 0
    return directory


@pytest.fixture
def study(finished, tmp_path):
    """A copy of the finished study to damage."""
    directory = tmp_path / ODD
    shutil.copytree(finished, directory)
    return directory


def _snapshot(directory) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(root, n), directory): Path(root, n).read_bytes()
        for root, _, names in os.walk(directory)
        for n in names
        if n != "lock"
    }


# ------------------------------------------------------------------------------------ the sealed spec


@pytest.mark.slow
def test_an_edited_spec_is_refused_naming_the_fields_and_nothing_is_rewritten(study, capsys):
    spec_path = study / "spec.json"
    sealed = json.loads(spec_path.read_text())
    before = _snapshot(study)
    # A traced domain (the trials trained at its old values would be reported at the new ones) ...
    traced = json.loads(json.dumps(sealed))
    traced["space"]["learning_rate"]["high"] *= 10
    spec_path.write_text(json.dumps(traced))
    assert main(["resume", str(study), "--no-progress"]) == 2
    _one_line(capsys.readouterr().err, "spec.json was edited after the study trained", "space.learning_rate.high")
    # ... a static field (the committed phases would be rewritten from scratch) and a budget.
    static = json.loads(json.dumps(sealed))
    static["space"]["batch_size"] = {"type": "Fixed", "value": 64}
    static["max_budget"] = 27.0
    spec_path.write_text(json.dumps(static))
    assert main(["resume", str(study), "--no-progress"]) == 2
    _one_line(capsys.readouterr().err, "space.batch_size", "max_budget", "spec.sealed.json")
    # A report of the unfinished study reads the spec too: refused the same way, nothing written.
    os.remove(study / "results.json")
    assert main(["report", str(study), "--no-files"]) == 2
    _one_line(capsys.readouterr().err, "space.batch_size")
    after = _snapshot(study)
    assert {k: v for k, v in after.items() if k != "spec.json"} == {
        k: v for k, v in before.items() if k not in ("spec.json", "results.json")
    }

    # What changes nothing trained is no edit; the sealed values resume.
    spec_path.write_text(json.dumps({**sealed, "max_configurations": 50}))
    assert main(["resume", str(study), "--no-progress", "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["selected"]["trial_id"] == json.loads(before["results.json"])["selected"]["trial_id"]


@pytest.mark.slow
def test_a_study_from_before_seals_is_sealed_on_resume_and_an_edited_seal_is_refused(study, capsys):
    os.remove(study / "spec.sealed.json")  # as an earlier version left it
    assert main(["resume", str(study), "--no-progress"]) == 0
    seal = json.loads((study / "spec.sealed.json").read_text())
    assert seal["spec"]["space"] == json.loads((study / "spec.json").read_text())["space"]
    capsys.readouterr()
    seal["spec"]["eta"] = 2  # the seal edited (by hand or damage): its digest no longer matches
    (study / "spec.sealed.json").write_text(json.dumps(seal))
    assert main(["resume", str(study), "--no-progress"]) == 2
    _one_line(capsys.readouterr().err, "spec.sealed.json was edited or is damaged", "delete it to accept")


def test_the_seal_names_nested_fields_and_leaves_out_what_trains_nothing(tmp_path):
    from sm2jax.spec import current_form
    from sm2jax.store.folder import differing_fields

    assert differing_fields(
        {"a": 1, "s": {"lr": {"high": 1, "low": 0}}}, {"a": 1, "s": {"lr": {"high": 2, "low": 0}}}
    ) == ["s.lr.high"]
    assert differing_fields({"a": 1}, {"b": 1}) == ["a", "b"]
    spec = StudySpec(space=SearchSpace({"learning_rate": LogUniform(1e-3, 1e-1, num=2)}).to_json())
    folder = StudyDir(tmp_path / "s")
    folder.claim(spec.to_json(), normalise=current_form)
    (tmp_path / "s" / "ledger.jsonl").write_text("{}\n")  # it has run
    edited = {**spec.to_json(), "imports": ["elsewhere"], "max_configurations": 7}
    folder.check_seal(edited, current_form)  # neither changes what was trained
    with pytest.raises(ValueError, match=r"differs in: seed\)"):
        folder.check_seal({**spec.to_json(), "seed": 1}, current_form)


# ---------------------------------------------------------------------------------- the ledger


@pytest.mark.slow
def test_a_duplicated_ledger_window_is_counted_once_and_reported_with_its_joules(study, capsys):
    before = json.loads((study / "results.json").read_text())
    ledger = study / "ledger.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    window = json.loads(lines[2])
    ledger.write_bytes(b"".join(lines) + lines[2])  # a restored backup, a bad merge
    with pytest.warns(RuntimeWarning, match="duplicate of line 3"):
        after = sm2jax.Study(str(study), progress=False).run()
    assert after["total_joules"] == pytest.approx(before["total_joules"], rel=1e-9)  # not +window["joules"]
    [damage] = after["ledger_damage"]
    assert damage["line"] == len(lines) + 1 and damage["joules"] == pytest.approx(window["joules"])
    assert f"window {window['window_id']}" in damage["reason"]
    assert (study / "ledger.jsonl.damaged").read_bytes() == lines[2]
    now = ledger.read_bytes()  # the original lines, then the resume's own records (its span)
    assert now.startswith(b"".join(lines)) and now.count(lines[2]) == 1
    from sm2jax.report import format_results

    assert f"ledger damage: line {len(lines) + 1} (duplicate of line 3" in format_results(after)


def test_a_window_copied_under_other_bytes_is_a_duplicate_by_its_id(tmp_path):
    window = {"type": "window", "window_id": "1-3", "attempt": 1, "joules": 2.0, "unattributed_joules": 0.0}
    trial = {"type": "trial", "trial_id": 0, "joules": 2.0}
    line = json.dumps({**window, "trials": [trial]})
    copy = json.dumps({**window, "trials": [trial]}, indent=None, separators=(",", ":"))  # re-serialised
    other = json.dumps({**window, "window_id": "1-4", "trials": [trial]})
    path = tmp_path / "ledger.jsonl"
    path.write_text("\n".join([line, copy, other]) + "\n")
    records, damage = scan_ledger(path)
    assert [r.get("window_id") for r in records if r["type"] == "window"] == ["1-3", "1-4"]
    assert [(d["line"], d["joules"]) for d in damage] == [(2, 2.0)] and "window 1-3" in damage[0]["reason"]


# ---------------------------------------------------------------------------------- sizes


def _quick_grid_with(points: int) -> int:
    from sm2jax.presets import digits

    space = SearchSpace.from_json(digits(quick=True).space)
    return space.grid_size() // space.domains["learning_rate"].size() * points


@pytest.mark.parametrize(
    "args, count",
    [
        (["--samples", "100000000"], 10**8),
        (["--set", 'space.learning_rate={"type": "LogUniform", "low": 1e-4, "high": 1, "num": 100000000}'], None),
    ],
)
def test_a_huge_count_is_one_line_in_well_under_a_second(tmp_path, capsys, args, count):
    count = f"{count or _quick_grid_with(10**8):,}"
    folder = tmp_path / "s"
    start = time.perf_counter()
    assert main(["run", *QUICK, "--dir", str(folder), *args]) == 2
    assert time.perf_counter() - start < 1.0  # sampling them would take ~1 h, listing ~100 GB
    _one_line(capsys.readouterr().err, f"{count} configurations", "limit of 10,000", "--set max_configurations=")
    assert not folder.exists()
    spec = StudySpec(space={"seed": {"type": "IntUniform", "low": 0, "high": 20000}}, max_configurations=30_000)
    assert spec.configuration_count() == 20_001  # a raised limit is honoured


# ---------------------------------------------------------------------------------- report under faults


def _read_only(directory):
    for root, _dirs, names in os.walk(directory):
        for n in names:
            os.chmod(os.path.join(root, n), 0o444)
        os.chmod(root, 0o555)


@pytest.mark.slow
def test_report_of_a_read_only_study_writes_everything_to_out(study, tmp_path):
    before = _snapshot(study)
    _read_only(study)
    out = tmp_path / "elsewhere" / ODD
    # Root writes through permissions: the child runs without that capability (as a user would).
    prefix = ["setpriv", "--bounding-set", "-dac_override", "--inh-caps", "-dac_override"] if os.geteuid() == 0 else []
    try:
        done = _cli("report", str(study), "--out", str(out), prefix=prefix)
        probe = subprocess.run([*prefix, "sh", "-c", f"touch '{study}/probe'"], capture_output=True, check=False)
    finally:
        for root, _, _ in os.walk(study):
            os.chmod(root, 0o755)
    assert probe.returncode != 0  # the study folder really was read-only for the child
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert set(REPORT_FILES) | {"optuna.db", "tensorboard"} <= set(os.listdir(out))
    assert _snapshot(study) == before  # nothing written to, or aimed at, the study
    import optuna

    loaded = optuna.load_study(study_name="sm2jax", storage=sqlite_url(out / "optuna.db"))
    assert len(loaded.trials) == len(json.loads(before["results.json"])["trials"])
    assert len(os.listdir(out / "tensorboard")) == len(loaded.trials)


@pytest.mark.slow
def test_report_on_a_full_disk_says_what_was_not_written_and_writes_the_rest(study, tmp_path):
    out = tmp_path / "out"
    sizes = {}
    full = _cli("report", str(study), "--out", str(out), limit=25_000)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    missing = [line for line in full.stderr.splitlines() if line.startswith("sm2jax: error:")]
    written = set(os.listdir(out))
    assert {"trials.csv", "decisions.csv", "energy.csv"} <= written  # small: written whole
    assert missing and all(
        ("not written" in line and "File too large" in line) or "optuna.db" in line for line in missing
    )
    for name in [*REPORT_FILES, "learning_curves.png", "optuna.db"]:
        said = any(f"{name} not written" in line for line in missing)
        assert said != (name in written), (name, full.stderr)  # each either written or said, never both
        if name in written:
            sizes[name] = os.path.getsize(out / name)
    assert all(size < 25_000 for size in sizes.values())  # nothing truncated at the limit
    assert not [n for n in written if n.endswith(".tmp")]
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY  # only the child was limited


@pytest.mark.slow
def test_report_with_optuna_db_a_folder_is_one_line_and_the_rest_is_written(study):
    (study / "optuna.db").unlink(missing_ok=True)  # a study that ran 30 s writes one itself
    (study / "optuna.db").mkdir()
    done = _cli("report", str(study))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    [line] = [x for x in done.stderr.splitlines() if x.startswith("sm2jax: error:")]
    assert "optuna.db not written" in line and "is a folder" in line
    assert set(REPORT_FILES) <= set(os.listdir(study / "report"))


# ---------------------------------------------------------------------------------- odd paths


@pytest.mark.slow
def test_a_study_in_a_path_with_url_syntax_reports_and_resumes_inside_its_folder(study, capsys):
    parent = study.parent
    assert main(["report", str(study)]) == 0
    assert "optuna-dashboard '" in capsys.readouterr().err  # a URL the shell passes whole
    assert sorted(os.listdir(parent)) == [ODD]  # no database cut off at '?' or '#' beside it
    import optuna

    loaded = optuna.load_study(study_name="sm2jax", storage=sqlite_url(study / "optuna.db"))
    results = json.loads((study / "results.json").read_text())
    assert len(loaded.trials) == len(results["trials"])
    # Resume from the checkpoint of a phase in that folder (the last phase discarded).
    last = max(StudyDir(study).saved_phases())
    os.remove(study / "results.json")
    os.remove(study / "progress" / f"phase-{last}.json")
    with pytest.warns(RuntimeWarning, match=f"checkpoint of phase {last} has no progress record"):
        assert main(["resume", str(study), "--no-progress", "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["selected"]["trial_id"] == results["selected"]["trial_id"] and resumed["attempts"] == 2


# ---------------------------------------------------------------------------------- errors that say where

BROKEN = textwrap.dedent("""
    import numpy as np
    from flax import nnx

    import sm2jax


    class Broken(nnx.Module):
        def __init__(self, inputs, outputs, rngs):
            self.lin = nnx.Linear(inputs, outputs, rngs=rngs)

        def __call__(self, x, *, train=False, key=None):
            if train:
                raise ValueError("the gate needs a warm-up first")
            return self.lin(x.reshape(x.shape[0], -1))


    sm2jax.register_model(
        "broken", lambda spec, shape, outputs, dropout, dtype, rngs: Broken(int(np.prod(shape)), outputs, rngs)
    )
""")


@pytest.mark.slow
def test_an_error_in_a_users_model_names_the_cohort_its_configurations_and_the_phase(tmp_path):
    (tmp_path / "broken_ext.py").write_text(BROKEN)
    args = ["run", *QUICK, "--import", "broken_ext", "--set", 'space.model={"name": "broken"}', "--dir", "s"]
    done = _cli(*args, cwd=tmp_path)
    assert done.returncode == 2
    _one_line(done.stderr, "cohort broken-bs", "failed in phase compile", "trials 0, ", "learning_rate=")
    assert "ValueError: the gate needs a warm-up first" in done.stderr
    debug = _cli("--debug", *args, cwd=tmp_path)
    assert "Traceback" in debug.stderr and "the gate needs a warm-up first" in debug.stderr
    assert "CohortError: cohort broken-bs" in debug.stderr


def _picky_study(tmp_path, task: str, **space):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype(np.float32), rng.integers(0, 3, 64).astype(np.int32)
    data = sm2jax.ArrayDataset("picky-data", task, x[:48], y[:48], x[48:], y[48:], 3)
    spec = StudySpec(
        space=SearchSpace({"learning_rate": LogUniform(1e-3, 1e-2, num=2), "batch_size": 16, **space}).to_json(),
        dataset="picky-data",
        max_budget=1,
        min_budget=1,
        explore_budget=0,
        idle_seconds=0,
        probe_width=False,
        energy_method="estimated",
    )
    return sm2jax.Study(tmp_path / "s", spec, dataset=data, progress=False)


def test_an_error_in_a_users_loss_names_the_cohort_and_keeps_the_error(tmp_path):
    def loss(outputs, targets):
        if outputs.shape[-1] == 3:
            raise RuntimeError("my loss expects 4 classes")
        return jnp.zeros(outputs.shape[0])

    metric = lambda o, y: jnp.zeros(o.shape[0])
    sm2jax.register_task(sm2jax.Task("picky", loss=loss, metric=metric, metric_name="m", higher_is_better=True))
    with pytest.raises(CohortError, match=r"cohort mlp-bs16-.* failed in phase compile \(trials 0, 1;") as raised:
        _picky_study(tmp_path, "picky").run()
    assert "RuntimeError: my loss expects 4 classes" in str(raised.value)
    assert isinstance(raised.value.__cause__, RuntimeError)  # the user's own error, with its traceback


def test_an_error_in_a_users_optimizer_names_the_cohort_and_keeps_the_error(tmp_path):
    def fussy(learning_rate, b1=0.9):
        raise TypeError("fussy needs a schedule, not a number")

    sm2jax.register_optimizer("fussy", fussy)
    with pytest.raises(CohortError, match=r"cohort mlp-bs16-fussy-.* failed in phase compile") as raised:
        _picky_study(tmp_path, "classification", optimizer="fussy").run()
    assert "TypeError: fussy needs a schedule, not a number" in str(raised.value)
    assert isinstance(raised.value.__cause__, TypeError)


# ---------------------------------------------------------------------------------- the compile cache


@pytest.mark.slow
def test_a_compile_cache_path_that_is_a_file_is_one_line_naming_the_cache(tmp_path):
    store = tmp_path / "xla_store.bin"
    store.write_bytes(b"\0")
    for where in (store, store / "sub"):
        done = _cli("run", *QUICK, "--dir", str(tmp_path / "s"), "--compile-cache", str(where))
        assert done.returncode == 2
        _one_line(done.stderr, "XLA compile cache", "SM2JAX_COMPILE_CACHE", "writable directory")
        assert not (tmp_path / "s").exists()  # before anything is written


def test_an_older_hyperband_run_resumes_and_its_edited_spec_is_refused(tmp_path):
    from sm2jax.hyperband import _current_form

    spec = StudySpec(space=SearchSpace({"learning_rate": LogUniform(1e-3, 1e-1, num=2)}).to_json())
    older = {k: v for k, v in spec.to_json().items() if k not in ("max_configurations", "explore_keep")}
    folder = StudyDir(tmp_path / "hb")
    folder.claim({"hyperband": older})  # as an earlier version wrote it, before fields were added
    os.remove(folder.seal_path)
    os.makedirs(folder.file("bracket-0"))
    (tmp_path / "hb" / "bracket-0" / "ledger.jsonl").write_text("{}\n")  # it has run
    folder.claim({"hyperband": spec.to_json()}, normalise=_current_form)  # resumes, and is sealed now
    edited = {"hyperband": {**older, "eta": 2}}
    (tmp_path / "hb" / "spec.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"edited after the study trained with it \(differs in: hyperband.eta\)"):
        folder.claim({"hyperband": {**spec.to_json(), "eta": 2}}, normalise=_current_form)
