"""Experiment configs and presets build valid studies; the notebook's code runs."""

import importlib.util
import json
import pathlib

import pytest

from sm2jax.cohort import group_into_cohorts
from sm2jax.presets import PRESETS
from sm2jax.study import StudySpec

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("folder", ["digits_sm2", "cifar10_resnet18", "household_lstm", "wikitext2_transformer"])
def test_experiment_config(folder):
    spec_file = importlib.util.spec_from_file_location(f"cfg_{folder}", ROOT / "experiments" / folder / "config.py")
    module = importlib.util.module_from_spec(spec_file)
    spec_file.loader.exec_module(module)
    assert "Run" in module.__doc__ and "Expected" in module.__doc__
    spec = module.get_config()
    assert isinstance(spec, StudySpec) and spec.phases()
    assert StudySpec(**json.loads(json.dumps(spec.to_json()))) == spec  # round-trips through spec.json
    assert group_into_cohorts(spec.configs())


def test_every_preset_has_a_quick_variant():
    for build in PRESETS.values():
        quick, full = build(quick=True), build()
        assert quick.max_budget <= full.max_budget


def test_notebook_is_valid_and_uses_the_public_api():
    nb = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")  # committed clean
    compile(code, "quickstart.ipynb", "exec")
    exec(nb["cells"][1]["source"][0], {})  # the import cell
