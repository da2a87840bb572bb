"""SM2 round 2 through whole studies: seed replicates in a study, and a forecast with its yardsticks."""

import numpy as np
import pytest
from conftest import quick_spec

from sm2jax.data import windows_to_dataset
from sm2jax.report import format_results
from sm2jax.space import Categorical, LogUniform, SearchSpace
from sm2jax.study import Study


def _spec(space, **kw):
    return quick_spec(space, **kw)


@pytest.mark.slow  # a whole study
def test_a_study_measures_seed_noise_with_replicates_that_are_never_selected(tmp_path):
    space = SearchSpace(
        {"model": {"name": "mlp", "hidden": [16]}, "learning_rate": LogUniform(1e-3, 1e-1, num=8), "batch_size": 32}
    )
    results = Study(tmp_path / "s", _spec(space, dataset="digits", replicates=2), progress=False).run()
    assert results["num_configs"] == 8 and results["replicates"] == 2
    (noise,) = results["seed_noise"]
    assert noise["phase"] == "explore" and noise["pairs"] == 2 and noise["measured"] and noise["seed_se"] >= 0
    replicas = {t["trial_id"]: t for t in results["trials"] if "replicate_of" in t}
    assert sorted(replicas) == [8, 9] and results["selected"]["trial_id"] < 8
    assert all(t["last_phase"] == "explore" and t["status"] == "replicate" for t in replicas.values())
    explore = [d for d in results["decisions"] if d["phase"] == "explore" and d["reason_code"] != "replicate"]
    assert all(d["seed_se"] == pytest.approx(noise["seed_se"]) for d in explore)
    text = format_results(results)
    assert "seed replicates: 2, never selected" in text and "seed noise +-" in text


@pytest.mark.slow  # a whole study
def test_a_forecast_study_reports_persistence_and_ridge_beside_its_selection(tmp_path):
    rng = np.random.default_rng(0)
    steps = 1500
    level = np.zeros(steps)
    for t in range(1, steps):
        level[t] = 0.7 * level[t - 1] + np.sin(2 * np.pi * t / 12) + rng.normal(0, 0.3)
    series = np.stack([level, np.cos(2 * np.pi * np.arange(steps) / 12)], 1).astype(np.float32)
    ds = windows_to_dataset(series, window=12, val_fraction=0.15, test_fraction=0.15)
    space = SearchSpace(
        {"model": {"name": "lstm", "hidden": 16}, "learning_rate": Categorical([3e-3, 1e-2]), "batch_size": 32}
    )
    results = Study(
        tmp_path / "f", _spec(space, dataset="series", replicates=0, max_budget=9), dataset=ds, progress=False
    ).run()
    yard = results["yardsticks"]
    assert yard["metric"] == "mse" and {"val", "test"} <= yard["persistence"].keys() <= yard["ridge"].keys() | {
        "val",
        "test",
    }
    test = results["selected"]["test"]["metric"]
    assert test < yard["persistence"]["test"]  # the cycle makes the last step a poor forecast
    text = format_results(results)
    assert "yardstick persistence (the last hour): mse val" in text and "yardstick ridge regression (lambda" in text
