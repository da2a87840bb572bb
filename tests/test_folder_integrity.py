"""A study folder nothing can corrupt: a lock, SIGTERM, atomic writes, a ledger of whole records,
a full disk, and every bad input a one-line error (exit 2) before anything is written."""

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import sm2jax.execute.trainer
from sm2jax.cli import main
from sm2jax.store.folder import StudyDir, write_json

QUICK = ["--quick", "--no-progress", "--idle-seconds", "0"]


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


@pytest.mark.parametrize(
    "assignment, words",
    [
        ("max_budget=abc", ["max_budget must be a finite number", "'abc'"]),
        ('eta="3"', ["eta must be an integer", "'3'"]),
        ("max_budget=1e400", ["max_budget must be a finite number", "inf"]),
        ("steps_per_window=-5", ["steps_per_window must be >= 1"]),
        ("width=0", ["width must be >= 1"]),
        ("width=-4", ["width must be >= 1"]),
        ("carbon_intensity=-475", ["carbon_intensity must be >= 0"]),
        ("memory_limit_bytes=-1", ["memory_limit_bytes must be >= 1"]),
        ("seed=-1", ["seed must be >= 0"]),
        ('space={"learning_rate": 0.01}', ["space: 'learning_rate' must be a domain"]),
        ("space=abc", ["space must be a mapping"]),
        ("dataset_options.nope=1", ["data set 'digits' takes no option 'nope'", "val_fraction"]),
        ("learning_rate=0.01", ["hyperparameter", "--set space.learning_rate=0.01"]),
    ],
)
def test_bad_values_are_one_line_errors_before_anything_is_written(tmp_path, capsys, assignment, words):
    folder = tmp_path / "s"
    assert main(["run", *QUICK, "--dir", str(folder), "--set", assignment]) == 2
    _one_line_error(capsys, *words)
    assert not folder.exists()


def test_a_hyperparameter_is_set_through_the_space(tmp_path):
    from sm2jax.cli import apply_overrides
    from sm2jax.presets import digits

    spec = apply_overrides(digits(quick=True), ["space.learning_rate=[0.01, 0.1]", "space.dropout=0.1"])
    values = {(c["learning_rate"], c["dropout"]) for c in spec.configs()}
    assert {lr for lr, _ in values} == {0.01, 0.1} and {d for _, d in values} == {0.1}


def test_unreadable_files_name_themselves(tmp_path, capsys):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "spec.json").write_text("{oops")
    assert main(["resume", str(folder)]) == 2
    _one_line_error(capsys, "spec.json is not valid JSON")
    (folder / "spec.json").write_text("{}")
    (folder / "results.json").write_text("[1,")
    assert main(["report", str(folder)]) == 2
    _one_line_error(capsys, "results.json is not valid JSON")
    assert main(["report", str(tmp_path / "missing")]) == 2
    _one_line_error(capsys, "no study in")


def test_writes_use_their_own_temporary_and_make_the_rename_durable(tmp_path, monkeypatch):
    renames, synced = [], []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda a, b: renames.append((a, b)) or real_replace(a, b))
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.isdir(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    write_json(tmp_path / "a.json", {"x": 1})
    write_json(tmp_path / "a.json", {"x": 2})
    (first, _), (second, _) = renames
    assert first != second and os.path.dirname(first) == str(tmp_path)  # two writers never share a file
    assert True in synced  # the folder itself, after the rename
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2} and os.listdir(tmp_path) == ["a.json"]
    assert oct((tmp_path / "a.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(tmp_path, capsys):
    folder = StudyDir(tmp_path / "s")
    with folder.lock():
        assert main(["run", *QUICK, "--dir", folder.path]) == 2
        _one_line_error(capsys, f"in use by pid {os.getpid()} on {socket.gethostname()}", "sm2jax resume")
        with pytest.raises(OSError, match="in use by pid"), folder.lock():
            pass
    assert not folder.exists("ledger.jsonl") and not folder.exists("checkpoints")  # nothing ran


def test_a_model_too_large_for_memory_is_infeasible_without_initialising_a_trial(tmp_path, monkeypatch):
    from sm2jax import Study
    from sm2jax.presets import digits

    def never(*args, **kwargs):
        raise AssertionError("init_rows ran for a cohort that cannot fit")

    monkeypatch.setattr(sm2jax.execute.trainer.CohortTrainer, "init_rows", never)
    import dataclasses

    spec = dataclasses.replace(digits(quick=True), memory_limit_bytes=1, idle_seconds=0.0)
    results = Study(tmp_path / "s", spec, progress=False).run()
    trials = results["num_configs"] + results["replicates"]  # SM2's seed replicates are trials too
    assert results["selected"] is None and len(results["infeasible"]) == trials


@pytest.mark.slow
def test_a_stale_lock_leftovers_and_a_damaged_ledger_are_taken_over_repaired_and_reported(tmp_path, capsys):
    folder = StudyDir(tmp_path / "s")
    os.makedirs(folder.file("progress"))
    # A killed holder (no live lock) and temporaries a kill left behind.
    (tmp_path / "s" / "lock").write_text(json.dumps({"pid": 999999, "host": "gone", "since": "then"}))
    for leftover in ("results.json.x1.tmp", "progress/phase-0.json.x2.tmp"):
        (tmp_path / "s" / leftover).write_text("{")
    assert main(["run", *QUICK, "--dir", folder.path]) == 0
    capsys.readouterr()
    assert not any(n.endswith(".tmp") for n in os.listdir(folder.path) + os.listdir(folder.file("progress")))
    before = folder.results()

    # Garbage in the middle of the ledger and an unreadable hardware.json: a resume repairs and reports.
    ledger = tmp_path / "s" / "ledger.jsonl"
    lines = ledger.read_bytes().split(b"\n")
    ledger.write_bytes(b"\n".join([lines[0], b"\xff\xfe garbage", *lines[1:]]))
    (tmp_path / "s" / "hardware.json").write_text("{")
    with pytest.warns(RuntimeWarning) as warned:
        from sm2jax import Study

        after = Study(folder.path, progress=False).run()
    messages = " ".join(str(w.message) for w in warned)
    assert "ledger.jsonl line 2" in messages and "hardware.json cannot be read" in messages
    assert [(d["line"], d["joules"]) for d in after["ledger_damage"]] == [(2, None)]
    from sm2jax.report import format_results

    assert "ledger damage: line 2 (not a ledger record (UnicodeDecodeError); unknown joules)" in format_results(after)
    assert after["total_joules"] == pytest.approx(before["total_joules"])  # nothing else lost or counted twice
    assert after["selected"]["trial_id"] == before["selected"]["trial_id"]
    assert (tmp_path / "s" / "ledger.jsonl.damaged").read_bytes() == b"\xff\xfe garbage\n"


@pytest.mark.slow
def test_sigterm_stops_the_study_like_ctrl_c_and_it_resumes(tmp_path):
    folder = tmp_path / "s"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "sm2jax.cli", "run", "--dir", str(folder), "--no-progress", "--idle-seconds", "0"]
    proc = subprocess.Popen(
        [*cmd, "--steps-per-window", "2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (folder / "progress" / "phase-0.json").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 143, err[-2000:]
    assert "terminated; `sm2jax resume" in err and "Traceback" not in err
    resumed = subprocess.run(
        [sys.executable, "-m", "sm2jax.cli", "resume", str(folder), "--no-progress", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    results = json.loads(resumed.stdout)
    assert resumed.returncode == 0 and results["selected"] is not None and results["attempts"] == 2


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_study_resumes(tmp_path):
    """A write limit (RLIMIT_FSIZE, as a full disk fails writes) that the checkpoint of a bigger
    model exceeds: exit 2 with one line, no Orbax or asyncio tracebacks; then it resumes."""
    folder = tmp_path / "s"
    limited = (  # the child limits itself (no fork hook in this multithreaded process)
        "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
        " resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000));"
        " sys.argv[0] = 'sm2jax'; runpy.run_module('sm2jax.cli', run_name='__main__')"
    )
    env = {**os.environ, "SM2JAX_COMPILE_CACHE": "off"}  # compiled programs would hit the limit too
    model = 'space.model={"name": "mlp", "hidden": [512]}'
    args = ["run", *QUICK, "--dir", str(folder), "--set", model]
    full = subprocess.run([sys.executable, "-c", limited, *args], env=env, capture_output=True, text=True, check=False)
    assert full.returncode == 2 and full.stderr.count("\n") == 1, full.stderr[-3000:]
    assert "cannot write the checkpoint of phase 0" in full.stderr and "File too large" in full.stderr
    again = subprocess.run(
        [sys.executable, "-m", "sm2jax.cli", *args], env=env, capture_output=True, text=True, check=False
    )
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.slow
def test_report_and_compare_work_on_a_hyperband_run(tmp_path, capsys):
    hb, sh = str(tmp_path / "hb"), str(tmp_path / "sh")
    for mode, folder in (("hyperband", hb), ("sh", sh)):
        assert main(["run", *QUICK, "--mode", mode, "--dir", folder, "--set", "max_budget=3"]) == 0
    capsys.readouterr()
    assert main(["compare", hb, sh]) == 0
    out = capsys.readouterr().out
    assert "hyperband" in out and "val_accuracy" in out.splitlines()[0]
    assert main(["report", hb]) == 0
    out = capsys.readouterr().out
    assert "round 1 (Hyperband bracket s=1, from budget 1)" in out and "round 2 (Hyperband bracket s=0" in out
    results = json.loads((tmp_path / "hb" / "results.json").read_text())
    assert [(r["bracket"], r["configs"]) for r in results["rounds"]] == [(1, 3), (0, 2)]
    trials = (tmp_path / "hb" / "report" / "trials.csv").read_text().splitlines()
    assert len(trials) == 1 + 3 + 2  # a header and every configuration of every bracket, in one study


@pytest.mark.slow
def test_a_hyperband_run_of_the_earlier_layout_reports_loads_and_resumes(tmp_path, capsys):
    """A run begun by an earlier version (one study per bracket in bracket-S/) still reports,
    compares, hands back its winner and, killed between brackets, resumes where it stopped."""
    from sm2jax.handback import load_selected
    from sm2jax.hyperband import finish_bracket_run
    from sm2jax.presets import PRESETS

    spec = dataclasses.replace(PRESETS["digits"](quick=True), max_budget=3, idle_seconds=0.0)  # as `run` makes it
    folder = StudyDir(tmp_path / "old")
    before = finish_bracket_run(folder, spec, progress=False)  # as the earlier version wrote it
    assert folder.bracket_run() and [b["s"] for b in before["brackets"]] == [1, 0]
    selected = before["selected"]
    assert load_selected(folder.path).trial_id == selected["trial_id"]  # the winning bracket's
    shutil.rmtree(folder.file("bracket-0"))  # killed before its last bracket began
    os.remove(folder.file("results.json"))
    assert main(["resume", folder.path, "--no-progress"]) == 0
    after = folder.results()
    assert [b["s"] for b in after["brackets"]] == [1, 0] and after["brackets"][0] == before["brackets"][0]
    assert after["brackets"][1]["selected"]["trial_id"] == before["brackets"][1]["selected"]["trial_id"]
    capsys.readouterr()
    assert main(["report", folder.path]) == 0
    assert "brackets (s, n, r):" in capsys.readouterr().out
    assert os.path.exists(os.path.join(folder.report_path, "bracket-0", "trials.csv"))
    assert main(["compare", folder.path]) == 0
    assert main(["run", *QUICK, "--mode", "hyperband", "--dir", folder.path, "--set", "max_budget=3"]) == 0  # same
