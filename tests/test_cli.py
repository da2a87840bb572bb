"""The README's run command path: `sm2jax run` prints the selection, its metric and energy by phase."""

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import pytest

from sm2jax.cli import main
from sm2jax.energy import make_meter


@pytest.mark.slow
def test_run_report_and_resume(tmp_path, capsys, monkeypatch):
    study = tmp_path / "study"
    assert main(["run", "--quick", "--dir", str(study), "--no-progress", "--idle-seconds", "0.1", "--no-probe"]) == 0
    out = capsys.readouterr().out
    assert "selected: trial" in out and "accuracy:" in out
    assert "energy by phase:" in out and "compile" in out and "explore" in out and "rung-1" in out
    assert "compilation (attempt 1):" in out and "vmap widths:" in out and "samples trained in all" in out
    # a quick study on a CPU backend trains with quick programs, and the report says which build ran
    assert ("; quick training program" in out) == (jax.default_backend() == "cpu")
    results = json.loads((study / "results.json").read_text())
    label = results["energy_method"]
    assert label == make_meter("auto").method  # what JAX computes on: the host on CPUs, NVML on GPUs
    assert f"[{label}]" in out
    if label == "estimated":
        assert "ESTIMATED" in out
    span = results["whole_span"]  # the study's energy from first to last reading: windows + the time between
    assert span["windows_joules"] == pytest.approx(results["total_joules"])  # one attempt: its windows are the total
    assert span["windows_joules"] + span["between_joules"] == pytest.approx(span["joules"])
    assert span["between_seconds"] > 0 and "whole span (first to last reading, 1 attempt(s)" in out

    assert main(["report", str(study)]) == 0
    assert capsys.readouterr().out.strip() == out.strip()

    # Resuming a finished study changes nothing (and --compile-cache is one setting).
    monkeypatch.setenv("SM2JAX_COMPILE_CACHE", "unchanged")  # restored after the test
    assert main(["resume", str(study), "--no-progress", "--json", "--compile-cache", str(tmp_path / "cache")]) == 0
    assert os.environ["SM2JAX_COMPILE_CACHE"] == str(tmp_path / "cache")
    again = json.loads(capsys.readouterr().out)
    assert again["selected"]["trial_id"] == results["selected"]["trial_id"]
    assert again["whole_span"]["attempts"] == 2 and again["whole_span"]["joules"] > span["joules"]


def test_bad_input_is_one_line_with_no_traceback(tmp_path, capsys):
    assert main(["resume", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "spec.json missing" in err and "Traceback" not in err

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "spec.json").write_text(json.dumps({"space": {}, "learning_rat": 0.1}))
    assert main(["resume", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown field(s) learning_rat" in err

    assert main(["report", str(bad)]) == 2  # an unfinished study is reported, but not from a bad spec
    assert "unknown field(s) learning_rat" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:  # checked before any folder is written
        main(["run", "--quick", "--energy", "bogus", "--dir", str(tmp_path / "never")])
    assert exit_info.value.code == 2 and not (tmp_path / "never").exists()
    capsys.readouterr()  # argparse's usage text

    assert main(["run", "--quick", "--set", "quick_compile=maybe", "--dir", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "quick_compile must be true or false (got 'maybe')" in err
        and not (tmp_path / "never").exists()
    )


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume(tmp_path):
    study = tmp_path / "study"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sm2jax.cli",
            "run",
            "--quick",
            "--dir",
            str(study),
            "--no-progress",
            "--idle-seconds",
            "0",
            "--no-probe",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (study / "ledger.jsonl").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.fail("the study finished before the interrupt; nothing was tested")
    assert proc.returncode == 130, err[-2000:]
    assert f"sm2jax resume {study}" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_cpu_study_on_a_machine_with_gpus_never_charges_them(tmp_path):
    """With the NVML double installed as the machine's pynvml (two 150 W cards) and JAX on the CPU
    backend, the study meters the host and names the GPUs only in its hardware profile."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(pathlib.Path(__file__).parent / "nvml_machine"), os.environ.get("PYTHONPATH", "")]
        ),
        "JAX_PLATFORMS": "cpu",
    }
    study = tmp_path / "s"
    cmd = [
        sys.executable,
        "-m",
        "sm2jax.cli",
        "run",
        "--quick",
        "--dir",
        str(study),
        "--no-progress",
        "--idle-seconds",
        "0.1",
        "--no-probe",
        "--json",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout)
    hardware = json.loads((study / "hardware.json").read_text())
    assert len(hardware["profile"]["gpus"]) == 2  # the double is what this process's NVML sees
    assert results["energy_method"] in ("estimated", "rapl") and hardware["metered_devices"] is None


def test_debug_after_the_subcommand_version_and_every_option_has_help(tmp_path, capsys):
    missing = str(tmp_path / "none")
    assert main(["report", missing]) == 2  # one line
    for argv in (["--debug", "report", missing], ["report", missing, "--debug"]):
        with pytest.raises(FileNotFoundError, match="no study in"):  # the traceback, either way
            main(argv)
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("sm2jax ")
    from sm2jax.cli import build_parser

    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for command, p in [("sm2jax", parser), *sub.choices.items()]:
        silent = [a.dest for a in p._actions if a.option_strings and not a.help]
        assert not silent, (command, silent)
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "finished study" not in capsys.readouterr().out


def test_help_imports_no_jax_and_lists_what_the_modules_define():
    code = (
        "import sys, sm2jax.cli as c; c.build_parser().format_help();"
        " print(sorted(m for m in ('jax', 'numpy', 'flax', 'optax') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"  # --help answers at once (JAX's import alone takes seconds)
    from sm2jax import cli
    from sm2jax.energy.meters import METHODS
    from sm2jax.presets import PRESETS

    assert cli.PRESET_NAMES == tuple(sorted(PRESETS)) and cli.ENERGY_METHODS == METHODS
