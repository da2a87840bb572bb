"""`sm2jax report DIR` writes CSV tables and PNG figures whose content matches the study."""

import csv
import json

import pytest
from conftest import quick_spec

from sm2jax.cli import main
from sm2jax.figures import pareto_front, plot_score_vs_energy, plot_survival, survival_rows
from sm2jax.space import Categorical, LogUniform, SearchSpace
from sm2jax.study import Study


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    directory = tmp_path_factory.mktemp("study") / "s"
    space = SearchSpace({"learning_rate": LogUniform(1e-3, 3e-1, num=3), "batch_size": Categorical([32, 64])}).to_json()
    spec = quick_spec(space)
    results = Study(directory, spec, progress=False).run()
    return directory, results


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_report_writes_tables_that_match_the_study(finished, capsys):
    directory, results = finished
    assert main(["report", str(directory)]) == 0
    out = directory / "report"
    trials = _read(out / "trials.csv")
    assert sorted(int(r["trial_id"]) for r in trials) == list(range(results["num_configs"]))  # every configuration
    selected = [r for r in trials if r["status"] == "selected"]
    assert [int(r["trial_id"]) for r in selected] == [results["selected"]["trial_id"]]
    last_decision = {}
    for d in results["decisions"]:
        last_decision[d["trial_id"]] = d
    for r in trials:
        d = last_decision[int(r["trial_id"])]
        assert r["last_phase"] == d["phase"]
        if r["status"] not in ("selected", "finalist"):
            assert not d["kept"] and r["status"] == d["reason_code"]
        assert json.loads(r["config.model"])["name"] == "mlp" and float(r["config.learning_rate"]) > 0
    joules = {int(r["trial_id"]): float(r["energy_joules"]) for r in trials}
    assert joules[results["selected"]["trial_id"]] == pytest.approx(results["selected"]["attributed_joules"])
    assert sum(joules.values()) == pytest.approx(results["total_joules"], rel=1e-6)  # every joule is some trial's
    assert len(_read(out / "decisions.csv")) == len(results["decisions"])
    energy = {r["phase"]: r for r in _read(out / "energy.csv")}
    assert set(energy) == set(results["energy_by_phase"])
    for phase, row in energy.items():
        assert float(row["kwh"]) == pytest.approx(results["energy_by_phase"][phase]["joules"] / 3.6e6)
        assert float(row["gco2e"]) == pytest.approx(float(row["kwh"]) * 475.0)
    assert "wrote trials.csv" in capsys.readouterr().err
    import pandas as pd

    frame = pd.read_csv(out / "trials.csv")
    assert len(frame) == results["num_configs"] and (frame["status"] == "selected").sum() == 1
    assert frame["energy_joules"].notna().all() and pd.read_csv(out / "energy.csv")["kwh"].gt(0).all()


@pytest.mark.slow
def test_report_figures_are_valid_pngs_that_show_every_configuration(finished):
    import matplotlib.image

    directory, results = finished
    assert main(["report", str(directory), "--out", str(directory / "figs")]) == 0
    for name in ("score_vs_energy", "survival", "energy_by_phase"):
        path = directory / "figs" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0.01  # not blank

    rows = survival_rows(results)
    assert sorted(r["trial_id"] for r in rows) == list(range(results["num_configs"]))
    phases = list(dict.fromkeys(d["phase"] for d in results["decisions"]))
    last = {d["trial_id"]: d["phase"] for d in results["decisions"]}
    assert all(phases[r["last"]] == last[r["trial_id"]] for r in rows)
    ax = plot_survival(results).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [r["label"] for r in rows]
    assert [t.get_text() for t in ax.texts].count("selected") == 1
    sel = results["selected"]["trial_id"]
    assert ax.texts[[r["trial_id"] for r in rows].index(sel)].get_text() == "selected"
    texts = [t.get_text() for t in plot_score_vs_energy(results).axes[0].texts]
    assert f"selected: trial {sel}" in texts


def test_figures_put_configurations_at_their_training_energy_and_say_what_they_leave_out(finished):
    from matplotlib.colors import to_hex

    from sm2jax.figures import plot_energy_by_phase, plot_learning_curves, training_joules

    _, results = finished
    trials = {t["trial_id"]: t for t in results["trials"]}
    sel = results["selected"]
    assert sel["training_joules"] == pytest.approx(trials[sel["trial_id"]]["energy_by_kind"]["train"])
    assert sel["training_joules"] < sel["attributed_joules"]  # its compile and evaluation shares apart
    ax = plot_score_vs_energy(results).axes[0]
    star = next(c for c in ax.collections if c.get_label() == "selected")
    assert star.get_offsets()[0][0] == pytest.approx(training_joules(trials[sel["trial_id"]]))
    assert "training energy" in ax.get_xlabel() and "compilation" in ax.get_title()
    fronts = [line for line in ax.get_lines() if "Pareto front" in line.get_label()]
    finals = {t["trial_id"] for t in results["trials"] if t["last_phase"] == "rung-2"}
    for line in fronts:  # a front joins only configurations measured at the final budget
        xs = set(line.get_xdata())
        assert xs <= {training_joules(trials[t]) for t in finals}
    compile_j = results["energy_by_phase"]["compile"]["joules"]
    rungs = [g["joules"] for p, g in results["energy_by_phase"].items() if p != "compile"]
    scale = plot_energy_by_phase(results).axes[0].get_yscale()
    assert scale == ("log" if compile_j > 10 * min(rungs) else "linear")
    curves = plot_learning_curves(results).axes[1]
    [entry] = [line for line in curves.get_lines() if line.get_label() == f"selected: trial {sel['trial_id']}"]
    [cohort] = [line for line in curves.get_lines() if line.get_label() == trials[sel["trial_id"]]["cohort"]]
    assert to_hex(entry.get_color()) == to_hex(cohort.get_color())  # drawn as the figure draws it


def test_pareto_front():
    points = [(1.0, 0.5, 0), (2.0, 0.9, 1), (2.0, 0.7, 2), (3.0, 0.8, 3), (0.5, 0.1, 4), (4.0, 0.95, 5)]
    assert pareto_front(points) == [4, 0, 1, 5]


@pytest.mark.slow
def test_compare_puts_studies_side_by_side(finished, tmp_path, capsys):
    import dataclasses

    from sm2jax.spec import read_spec

    directory, _results = finished
    sh = Study(tmp_path / "sh", dataclasses.replace(read_spec(directory), mode="sh"), progress=False).run()
    assert main(["compare", str(directory), str(tmp_path / "sh"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["mode"] for r in rows] == ["sm2", "sh"]
    assert rows[0]["samples_vs_first"] == 1.0 and rows[0]["training_vs_first"] == 1.0
    assert (
        rows[1]["samples_trained"] == sum(t["samples"] for t in sh["trials"]) > rows[0]["samples_trained"]
    )  # SM2 explored, then dropped
    assert rows[1]["val_accuracy"] == pytest.approx(sh["selected"]["metric"])
    assert main(["compare", str(directory), str(tmp_path / "sh")]) == 0
    assert "training_vs_first" in capsys.readouterr().out


@pytest.mark.slow  # (the module's study)
def test_a_results_file_from_before_the_energy_names_were_told_apart_still_reports(finished):
    from sm2jax.report import format_results

    _, results = finished
    old = json.loads(json.dumps(results))
    old["selected"]["energy_to_train_joules"] = old["selected"].pop("attributed_joules")
    for f in old["finalists"]:
        f["energy_to_train_j"] = f.pop("projected_train_joules")
    assert format_results(old) == format_results(results)
