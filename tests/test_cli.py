"""The README's run command path: `sm2jax run` prints the selection, its metric and energy by phase."""

import json
import os

from sm2jax.cli import main


def test_run_report_and_resume(tmp_path, capsys, monkeypatch):
    study = tmp_path / "study"
    assert main(["run", "--quick", "--dir", str(study), "--no-progress", "--idle-seconds", "0.1", "--no-probe"]) == 0
    out = capsys.readouterr().out
    assert "selected: trial" in out and "accuracy:" in out
    assert "energy by phase:" in out and "compile" in out and "explore" in out and "rung-1" in out
    assert "compilation (this attempt):" in out and "vmap widths:" in out
    results = json.loads((study / "results.json").read_text())
    label = results["energy_method"]
    assert label in ("estimated", "rapl")  # CPU-only machine: never a GPU figure
    assert f"[{label}]" in out
    if label == "estimated":
        assert "ESTIMATED" in out

    assert main(["report", str(study)]) == 0
    assert capsys.readouterr().out.strip() == out.strip()

    # Resuming a finished study changes nothing (and --compile-cache is one setting).
    monkeypatch.setenv("SM2JAX_COMPILE_CACHE", "unchanged")  # restored after the test
    assert main(["resume", str(study), "--no-progress", "--json", "--compile-cache", str(tmp_path / "cache")]) == 0
    assert os.environ["SM2JAX_COMPILE_CACHE"] == str(tmp_path / "cache")
    again = json.loads(capsys.readouterr().out)
    assert again["selected"]["trial_id"] == results["selected"]["trial_id"]
