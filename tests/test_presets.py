"""Experiment configs and presets build valid studies; the notebook's code runs."""

import importlib.util
import json
import pathlib

import pytest

from sm2jax.cohort import group_into_cohorts
from sm2jax.presets import PRESETS
from sm2jax.spec import StudySpec

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "folder", ["digits_sm2", "mnist1d", "cifar10_resnet18", "household_lstm", "wikitext2_transformer"]
)
def test_experiment_config(folder):
    spec_file = importlib.util.spec_from_file_location(f"cfg_{folder}", ROOT / "experiments" / folder / "config.py")
    module = importlib.util.module_from_spec(spec_file)
    spec_file.loader.exec_module(module)
    assert "Run" in module.__doc__ and "Expected" in module.__doc__
    spec = module.get_config()
    assert isinstance(spec, StudySpec) and spec.phases()
    assert StudySpec(**json.loads(json.dumps(spec.to_json()))) == spec  # round-trips through spec.json
    assert group_into_cohorts(spec.configs())


def test_every_preset_has_a_quick_variant_that_does_less():
    for name, build in PRESETS.items():
        quick, full = build(quick=True), build()
        work = lambda spec: len(spec.configs()) * spec.max_budget
        assert work(quick) < work(full), name


@pytest.mark.slow
def test_notebook_runs_every_cell(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    source = ROOT / "notebooks" / "quickstart.ipynb"
    nb = nbformat.read(source, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed clean
    # Executed in a scratch folder (the notebook writes runs/ next to itself), on this machine's CPU.
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert "selected: trial" in text and "rung-1" in text
    stderr = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stderr")
    assert "Warning" not in stderr and "IProgress" not in stderr  # progress bars render without warnings
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 5  # score vs energy, survival, energy by phase, learning curves; SM2 vs SH
    # The comparison says whether one side loaded the other's compiled programs from the cache.
    assert "compare training_joules" in text or "both studies compiled (or loaded) their programs alike" in text
    tables = [
        o["data"]["text/html"]
        for o in outputs
        if o.output_type in ("execute_result", "display_data") and "text/html" in o.get("data", {})
    ]
    assert len(tables) == 2 and "params_learning_rate" in tables[0]  # the trials DataFrame, then SM2 vs SH
    # The winner handed back reproduces the reported test accuracy; the comparison says plainly whether
    # the energy difference stands beyond its noise, beside the samples each trained.
    [winner] = [line for line in text.splitlines() if "(reported " in line]
    assert winner.split("test accuracy ")[1].split(" ")[0] == winner.split("(reported ")[1].rstrip(")")
    assert "the samples of SH for" in text and "the noise (2 sigma =" in text
    assert ">sm2<" in tables[1] and ">sh<" in tables[1] and "training_vs_first" in tables[1]
    for name in ("notebook-digits", "notebook-digits-sh"):
        assert (tmp_path / "runs" / name / "results.json").exists()


@pytest.mark.slow
def test_mnist1d_quick_preset_runs_offline(tmp_path):
    import dataclasses

    from sm2jax.study import Study

    spec = dataclasses.replace(
        PRESETS["mnist1d"](quick=True), idle_seconds=0.0, energy_method="estimated", probe_width=False
    )
    results = Study(tmp_path / "s", spec, progress=False).run()
    models = {t["config"]["model"]["name"] for t in results["trials"]}
    assert models == {"mlp", "cnn1d"} and len(results["trials"]) == 4
    assert results["selected"]["test"]["metric"] > 0.2  # ten classes: clearly above chance after 3 epochs
