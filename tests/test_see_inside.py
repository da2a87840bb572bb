"""Inside a study: learning curves, a report of an unfinished study, TensorBoard and Optuna read
back, and comparisons that say when compilation differs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from kill import kill_mid_phase

from sm2jax.cli import main
from sm2jax.figures import compare_rows, compile_warning
from sm2jax.viewers import sqlite_url, write_optuna

QUICK = ["--quick", "--no-progress", "--idle-seconds", "0"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("see") / "s"
    assert main(["run", *QUICK, "--dir", str(folder)]) == 0
    return folder, json.loads((folder / "results.json").read_text())


@pytest.mark.slow
def test_curves_are_recorded_per_window_and_per_phase(finished):
    _, results = finished
    curves, trials = results["curves"], {t["trial_id"]: t for t in results["trials"]}
    assert set(map(int, curves)) == set(trials)
    for key, curve in curves.items():
        t = trials[int(key)]
        phases = [p for _, _, p in curve["val"]]
        assert phases and phases[-1] == t["last_phase"]  # a dropped configuration's curve ends where it was dropped
        assert [s for s, _, _ in curve["val"]] == sorted(s for s, _, _ in curve["val"])
        assert curve["train"] and curve["train"][-1][0] == t["samples"] and all(loss > 0 for _, loss in curve["train"])
    sel = str(results["selected"]["trial_id"])
    assert curves[sel]["val"][-1][1] == pytest.approx(results["selected"]["score"])


@pytest.mark.slow
def test_tensorboard_and_optuna_read_back_every_configuration(finished):
    import optuna
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    folder, results = finished
    assert main(["report", str(folder)]) == 0  # writes optuna.db too
    for t in results["trials"]:
        events = EventAccumulator(str(folder / "tensorboard" / f"trial-{t['trial_id']:04d}"))
        events.Reload()
        content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        assert hparams["learning_rate"].number_value == pytest.approx(t["config"]["learning_rate"])
        assert json.loads(hparams["model"].string_value) == t["config"]["model"]
        assert hparams["phase_reached"].string_value == t["last_phase"]
        assert hparams["selected"].bool_value == (t["trial_id"] == results["selected"]["trial_id"])
        val = [(e.step, e.value) for e in events.Scalars("val/score")]
        assert val == [(s, pytest.approx(v)) for s, v, _ in results["curves"][str(t["trial_id"])]["val"]]
        assert events.Scalars("train/loss")[-1].step == t["samples"]
        last = [d for d in results["decisions"] if d["trial_id"] == t["trial_id"]][-1]  # what decisions saw
        assert events.Scalars("energy/train_eval_joules")[-1].value == pytest.approx(last["energy_spent_j"])
    study = optuna.load_study(study_name="sm2jax", storage=sqlite_url(folder / "optuna.db"))
    by_id = {tr.user_attrs["trial_id"]: tr for tr in study.trials}
    assert set(by_id) == {t["trial_id"] for t in results["trials"]}
    for t in results["trials"]:
        tr = by_id[t["trial_id"]]
        assert tr.params["learning_rate"] == t["config"]["learning_rate"]
        assert set(tr.params) == {"learning_rate", "batch_size"}  # what is searched; constants are no parameters
        assert tr.distributions["learning_rate"].log and tr.distributions["learning_rate"].low == 3e-3
        assert tr.datetime_complete > tr.datetime_start  # from the ledger's windows
        assert tr.user_attrs["energy_joules"] == pytest.approx(t["energy_joules"])
        assert tr.state.name == ("COMPLETE" if t["last_phase"] == "rung-2" else "PRUNED")
        assert sorted(tr.intermediate_values.items()) == [
            (s, pytest.approx(v)) for s, v, _ in results["curves"][str(t["trial_id"])]["val"]
        ]
    assert study.best_trial.user_attrs["trial_id"] == results["selected"]["trial_id"]


@pytest.mark.slow
def test_report_of_an_interrupted_study_has_its_decisions_and_curves(tmp_path, capsys):
    folder = tmp_path / "s"
    assert main(["run", *QUICK, "--dir", str(folder), "--steps-per-window", "2"]) == 0
    os.remove(folder / "results.json")  # as if it had not finished: resume it and kill it mid rung-2
    for name in ("phase-3.json", "phase-2.json"):
        if (folder / "progress" / name).exists():
            os.remove(folder / "progress" / name)
    kill_mid_phase(folder, phase="rung-2")  # the study trains in windows of 2 steps (its spec)
    capsys.readouterr()
    assert main(["report", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "status: interrupted, phases done: explore, rung-1; `sm2jax resume" in out
    assert "phases left: rung-2" in out and "selected: none -- not selected yet" in out
    assert (folder / "report" / "learning_curves.png").stat().st_size > 0
    rows = (folder / "report" / "trials.csv").read_text().splitlines()
    assert len(rows) == 5  # a header and the four configurations


def test_a_comparison_warns_when_one_side_compiled_and_the_other_loaded():
    def study(name, compiled, loaded):
        return {
            "study": name,
            "mode": "sm2",
            "energy_by_phase": {"compile": {"joules": 20.0}, "rung-1": {"joules": 5.0}},
            "compilation": {"backend_compiles": compiled, "cache_hits": loaded},
            "trials": [{"samples": 10}],
        }

    rows = compare_rows([study("sm2", 5, 0), study("sh", 0, 5)])
    assert [r["training_joules"] for r in rows] == [5.0, 5.0] and rows[1]["programs_loaded"] == 5
    assert "sm2 compiled programs while sh loaded them" in compile_warning(rows)
    assert compile_warning(compare_rows([study("a", 5, 0), study("b", 5, 0)])) is None
    heavy, light = study("sm2", 0, 0), study("sh", 0, 0)  # neither counted a compile (a finished study re-run)
    heavy["energy_by_phase"]["compile"]["joules"], light["energy_by_phase"]["compile"]["joules"] = 65.0, 19.0
    assert "compilation cost differs more than 2x (sm2 65.0 J, sh 19.0 J)" in compile_warning(
        compare_rows([heavy, light])
    )


@pytest.mark.slow
def test_a_finished_study_run_again_keeps_its_compile_record(finished, tmp_path):
    import shutil

    from sm2jax.study import Study

    source, results = finished
    shutil.copytree(source, tmp_path / "s")
    again = Study(str(tmp_path / "s"), progress=False).run()
    assert again["compilation"] == results["compilation"]  # not this attempt's "0 compiles"
    assert again["energy_by_phase"]["compile"] == results["energy_by_phase"]["compile"]


@pytest.mark.slow
def test_optuna_dashboard_follows_a_running_study_and_reads_one_stopped_after_rung_1(tmp_path):
    import optuna

    from sm2jax.phases import StudyState
    from sm2jax.store.folder import StudyDir

    folder = tmp_path / "s"
    cmd = [sys.executable, "-m", "sm2jax.cli", "run", *QUICK, "--dir", str(folder), "--steps-per-window", "2"]
    cmd += ["--set", "optuna_seconds=0"]  # rewritten after every phase (by default: once 30 s have passed)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (folder / "progress" / "phase-1.json").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err.decode()[-2000:]
    saved = StudyDir(folder).saved_phases()
    state = StudyState.from_json(StudyDir(folder).load_progress(saved[-1]))
    study = optuna.load_study(study_name="sm2jax", storage=sqlite_url(folder / "optuna.db"))
    assert study.user_attrs["finished"] is False and study.user_attrs["mode"] == "sm2"
    alive = {t for ids in state.alive.values() for t in ids}
    by_id = {tr.user_attrs["trial_id"]: tr for tr in study.trials}
    assert set(by_id) == {int(t) for t in state.trials}  # the last committed phase, whole
    for t, tr in by_id.items():
        assert tr.state.name == ("RUNNING" if t in alive else "PRUNED"), (t, tr.state)
        assert sorted(tr.intermediate_values.items()) == [
            (s, pytest.approx(v)) for s, v, _ in state.curves[str(t)]["val"]
        ]


def test_seed_replicates_are_attributes_of_their_configuration_in_optuna(tmp_path):
    import optuna

    def row(trial_id, lr, seed, status, **extra):
        config = {"learning_rate": lr, "seed": seed, "optimizer": "adam"}
        return {
            "trial_id": trial_id,
            "config": config,
            "status": status,
            "last_phase": "explore",
            "reason": "",
            "cohort": "c",
            "score": 0.5 + trial_id / 10,
            "energy_joules": 1.0,
            "samples": 10,
            **extra,
        }

    results = {
        "mode": "sm2",
        "space": {
            "learning_rate": {"type": "LogUniform", "low": 1e-3, "high": 1e-1, "num": 2},
            "optimizer": {"type": "Fixed", "value": "adam"},
        },
        "trials": [
            row(0, 1e-3, 0, "selected"),
            row(1, 1e-1, 0, "dominated_in_cohort"),
            row(2, 1e-3, 1000003, "replicate", replicate_of=0),
        ],
        "curves": {},
    }
    write_optuna(str(tmp_path), results)
    study = optuna.load_study(study_name="sm2jax", storage=sqlite_url(tmp_path / "optuna.db"))
    assert [tr.user_attrs["trial_id"] for tr in study.trials] == [0, 1]  # the replicate is no trial of its own
    assert study.trials[0].user_attrs["seed_replicates"] == [{"trial_id": 2, "seed": 1000003, "score": 0.7}]
    assert [tr.state.name for tr in study.trials] == ["COMPLETE", "PRUNED"] and study.best_value == 0.5
    assert set(study.trials[0].params) == {"learning_rate"}  # the fixed optimizer is no parameter


@pytest.mark.slow
def test_a_running_study_reports_its_phase_in_flight_as_in_progress_not_interrupted(finished, tmp_path):
    import shutil

    from sm2jax.report import format_results, partial_results
    from sm2jax.store.folder import StudyDir

    source, _ = finished
    folder = StudyDir(tmp_path / "s")
    shutil.copytree(source, folder.path)
    for name in ("results.json", "progress", "checkpoints"):  # as it is before its first phase is committed
        shutil.rmtree(folder.file(name)) if os.path.isdir(folder.file(name)) else os.remove(folder.file(name))
    with folder.lock():  # a run holds the folder: what the ledger has is the running attempt's
        running = partial_results(folder)
    assert running["partial"]["status"] == "running" and running["partial"]["in_progress"] == "explore"
    assert running["interrupted_energy_by_phase"] == {} and running["in_progress_joules"] > 0
    text = format_results(running)
    assert "in progress: explore" in text and "interrupted attempts" not in text
    assert "in progress (the running attempt, phases not committed yet)" in text
    stopped = partial_results(folder)  # nobody holds it: the same energy was a killed attempt's
    assert stopped["partial"]["status"] == "interrupted" and stopped["in_progress_energy_by_phase"] == {}
    assert stopped["interrupted_joules"] == pytest.approx(running["in_progress_joules"])
    assert "interrupted attempts (killed runs" in format_results(stopped)


@pytest.mark.slow
def test_one_progress_line_for_the_whole_study_with_its_compilation_and_phases(tmp_path, capsys):
    assert main(["run", "--quick", "--idle-seconds", "0", "--dir", str(tmp_path / "s")]) == 0
    frames = [f for f in capsys.readouterr().err.replace("\r", "\n").splitlines() if f.strip()]
    assert frames and all(f.startswith("study:") for f in frames)  # one line, redrawn: no bar per phase
    said = " ".join(frames)
    assert "compiling (or loading) the programs of cohort 1/2" in said
    assert all(f"{phase}: trials alive" in said for phase in ("explore", "rung-1", "rung-2"))
    last = frames[-1]
    assert "100%" in last and "trial-step/s" in last
    done, total = last.split("|")[2].split()[0].split("/")
    assert done == total and int(done) > 0  # ends at the trial-steps it trained, whatever it planned
