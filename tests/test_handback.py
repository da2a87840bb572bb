"""What a study found, handed back: the trained selection (and any finalist) as a Flax model that
reproduces the reported figures, an export that loads in a new process, and a DataFrame."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import quick_spec

import sm2jax
from sm2jax.cli import main
from sm2jax.data import load_digits
from sm2jax.space import Categorical, LogUniform, SearchSpace


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Plain successive halving with two finalists in two cohorts (batch 32 and 64)."""
    root = tmp_path_factory.mktemp("handback")
    space = SearchSpace({"learning_rate": LogUniform(3e-3, 3e-2, num=2), "batch_size": Categorical([32, 64])})
    spec = quick_spec(space, mode="sh")
    study = sm2jax.Study(root / "s", spec, progress=False)
    return root, study, study.run()


@pytest.mark.slow
def test_the_selection_loads_from_a_relative_path_and_reproduces_the_reported_test_metric(finished, monkeypatch):
    root, study, results = finished
    monkeypatch.chdir(root)
    trained = sm2jax.load_selected("s")
    data = load_digits()
    assert trained.trial_id == results["selected"]["trial_id"] and trained.selected
    assert trained.config == results["selected"]["config"]
    test = trained.evaluate(data.x_test, data.y_test)
    assert test["metric"] == results["selected"]["test"]["metric"]  # exactly: the same parameters, the same sums
    assert trained.scores["test"] == results["selected"]["test"]
    assert trained(data.x_test[:5]).shape == (5, 10)
    assert study.selected_model().evaluate(data.x_test, data.y_test) == test


@pytest.mark.slow
def test_every_finalist_loads_with_its_reported_validation_score_and_a_dropped_trial_is_one_line(finished):
    root, _, results = finished
    data = load_digits()
    finalists = [f["trial_id"] for f in results["finalists"]]
    assert len(finalists) == 2 and len({t["cohort"] for t in results["trials"] if t["trial_id"] in finalists}) == 2
    for f in results["finalists"]:
        trained = sm2jax.load_selected(root / "s", f["trial_id"])
        assert trained.selected == (f["trial_id"] == results["selected"]["trial_id"])
        assert trained.evaluate(data.x_val, data.y_val)["score"] == f["score"]
        assert trained.scores["validation"]["score"] == f["score"]
    dropped = next(t["trial_id"] for t in results["trials"] if t["trial_id"] not in finalists)
    with pytest.raises(
        ValueError,
        match=rf"trial {dropped} has no trained parameters .* keeps trial\(s\) {re.escape(str(sorted(finalists)))}",
    ):
        sm2jax.load_selected(root / "s", dropped)
    again = sm2jax.Study(root / "s", progress=False).run()  # a finished study resumes from its finalists
    assert again["selected"]["trial_id"] == results["selected"]["trial_id"]


@pytest.mark.slow
def test_an_export_loads_in_a_new_process_without_the_study(finished, tmp_path, monkeypatch, capsys):
    root, _, results = finished
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(root / "s"), "winner"]) == 0
    assert f"trial {results['selected']['trial_id']} (selected)" in capsys.readouterr().out
    assert main(["export", str(root / "s"), "winner"]) == 2  # never overwritten
    assert "exists and is not an empty folder" in capsys.readouterr().err
    code = (
        "import json, sm2jax; from sm2jax.data import load_digits; d = load_digits();"
        " t = sm2jax.load_selected('winner');"
        " print(json.dumps({'test': t.evaluate(d.x_test, d.y_test)['metric'], 'trial': t.trial_id, 'config': t.config}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert loaded["test"] == results["selected"]["test"]["metric"]
    assert loaded["trial"] == results["selected"]["trial_id"] and loaded["config"] == results["selected"]["config"]
    assert sorted(os.listdir(tmp_path / "winner")) == ["sm2jax-export.json", "state"]


@pytest.mark.slow
def test_results_as_a_dataframe_one_row_per_configuration(finished):
    root, _, results = finished
    frame = sm2jax.load_results(root / "s").trials_dataframe()
    assert len(frame) == results["num_configs"] and sorted(frame["trial_id"]) == list(range(results["num_configs"]))
    assert (frame["status"] == "selected").sum() == 1
    assert frame.loc[frame["status"] == "selected", "trial_id"].item() == results["selected"]["trial_id"]
    assert {"params_learning_rate", "params_batch_size", "params_model", "score_rung-1", "score_rung-2"} <= set(frame)
    assert frame["score_rung-1"].notna().all() and frame["score_rung-2"].notna().sum() == 2  # the finalists
    kinds = [c for c in frame if c.startswith("energy_") and c.endswith("_j")]
    assert {"energy_train_j", "energy_eval_j", "energy_compile_j"} <= set(kinds)
    assert frame[kinds].sum(axis=1).to_numpy() == pytest.approx(frame["energy_joules"].to_numpy())
    assert frame["energy_joules"].sum() == pytest.approx(results["total_joules"])
    assert (frame["energy_method"] == results["energy_method"]).all()  # how each figure was obtained
    assert set(frame["phase_reached"]) == {"rung-1", "rung-2"}
