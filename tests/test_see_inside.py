"""Inside a study: learning curves, a report of an unfinished study, TensorBoard and Optuna read
back, and comparisons that say when compilation differs."""

import json
import os

import pytest
from kill import kill_mid_phase

from sm2jax.cli import main
from sm2jax.figures import compare_rows, compile_warning

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

    folder, results = finished
    assert main(["report", str(folder)]) == 0  # writes optuna.db too
    for t in results["trials"]:
        events = EventAccumulator(str(folder / "tensorboard" / f"trial-{t['trial_id']:04d}"))
        events.Reload()
        val = [(e.step, e.value) for e in events.Scalars("val/score")]
        assert val == [(s, pytest.approx(v)) for s, v, _ in results["curves"][str(t["trial_id"])]["val"]]
        assert events.Scalars("train/loss")[-1].step == t["samples"]
        last = [d for d in results["decisions"] if d["trial_id"] == t["trial_id"]][-1]  # what decisions saw
        assert events.Scalars("energy/train_eval_joules")[-1].value == pytest.approx(last["energy_spent_j"])
    study = optuna.load_study(study_name="sm2jax", storage=f"sqlite:///{folder / 'optuna.db'}")
    by_id = {tr.user_attrs["trial_id"]: tr for tr in study.trials}
    assert set(by_id) == {t["trial_id"] for t in results["trials"]}
    for t in results["trials"]:
        tr = by_id[t["trial_id"]]
        assert tr.params["learning_rate"] == t["config"]["learning_rate"]
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
    kill_mid_phase(folder, phase="rung-2", args=("--steps-per-window", "2"))
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
