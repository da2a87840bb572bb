"""Scale out: the trial axis sharded over several devices and several processes (CPU devices here:
XLA's host platform device count, set per subprocess; two processes joined through
``jax.distributed`` with gloo collectives on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from kill import kill_mid_phase

from sm2jax.energy import read_ledger
from sm2jax.energy.ledger import attribute_by_device
from sm2jax.space import Categorical, LogUniform, SearchSpace
from sm2jax.spec import StudySpec
from sm2jax.study import Study

HERE = os.path.dirname(__file__)


def _env(devices: int) -> dict:
    """A subprocess on ``devices`` CPU devices (CPU even on a machine with a GPU)."""
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.path.dirname(HERE),
    }


def _reference(directory, spec: StudySpec) -> dict:
    """The uninterrupted study on one CPU device (a subprocess, so that it runs on the CPU where the
    others do, whatever this machine's default device)."""
    Study(directory, spec, progress=False)  # writes spec.json
    out = subprocess.run(
        [sys.executable, "-m", "sm2jax.cli", "resume", str(directory), "--no-progress", "--json"],
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def _decisions(results) -> list:
    return [(d["phase"], d["trial_id"], d["kept"]) for d in results["decisions"]]


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("four")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "scale_out_child.py"), str(out)],
        env=_env(4),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT ") :])


@pytest.mark.slow
def test_a_study_on_four_devices_matches_one_device(four_devices):
    one, four = four_devices["d1"], four_devices["d4"]
    assert four_devices["devices"] == 4
    assert set(one["scores"]) == set(four["scores"]) and len(one["scores"]) == 12
    for t, score in one["scores"].items():
        assert four["scores"][t] == pytest.approx(score, abs=1e-6)  # 200 validation examples: one example is 5e-3
    assert four["decisions"] == one["decisions"] and four["selected"] == one["selected"]
    # Widths are multiples of the device count; 6 trials at width 8: 2 padding rows took no energy.
    assert all(w % 4 == 0 for w in four["widths"].values()) and set(four["widths"].values()) == {8}
    assert four["ledger_trials"] == list(range(12))


@pytest.mark.slow
def test_the_sharded_step_has_no_collective_and_donates_its_state(four_devices):
    p = four_devices["programs"]
    assert p["psum_collectives"] == ["all-reduce"]  # the check sees a collective where there is one
    assert p["train_collectives"] == [] and p["eval_collectives"] == []
    assert p["state_sharding"] == "P('trials',)" and p["shard_rows"] == [2, 2, 2, 2]  # 8 rows, 2 per device
    # XLA reports per device: each device's rows are aliased input -> output (one copy of the state).
    assert p["alias_bytes"] * 4 >= 0.99 * p["state_bytes"]
    # ... and so does its cost analysis: FLOPs per trial-step and per example do not depend on the
    # device count (they weigh energy among trials and predict a cohort's training time).
    (step4, fwd4), (step1, fwd1) = p["flops"]["4"], p["flops"]["1"]
    assert step4 == pytest.approx(step1, rel=0.01) and fwd4 == pytest.approx(fwd1, rel=0.01) and step1 > 0 and fwd1 > 0


@pytest.mark.slow
def test_a_device_with_only_padding_skips_the_step(four_devices):
    p = four_devices["padding"]
    assert four_devices["programs"]["train_has_branch"]
    assert p["trial_ids"] == [0, -1, -1, -1] and p["steps"] == [5, 0, 0, 0]
    assert p["padding_params_unchanged"]
    assert p["real_row_max_diff"] <= 1e-6  # trial 0 trains as it does among 7 real neighbours


def test_request_cpu_devices_respects_xla_flags(monkeypatch):
    from sm2jax.execute.placement import MAX_CPU_DEVICES, request_cpu_devices

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
    assert request_cpu_devices() is None and os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert request_cpu_devices(2) == 2
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2"
    monkeypatch.delenv("XLA_FLAGS")
    n = request_cpu_devices()
    assert 1 <= n <= MAX_CPU_DEVICES and os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count={n}"
    with pytest.raises(ValueError, match="at least 1"):
        request_cpu_devices(0)


@pytest.mark.slow
def test_too_many_devices_is_a_one_line_error(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sm2jax.cli",
            "run",
            "--quick",
            "--dir",
            str(tmp_path / "s"),
            "--devices",
            "3",
            "--no-progress",
        ],
        env=_env(2),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "sm2jax: error: devices: 3 requested, 2 available (cpu); pass a count from 1 to 2, or none for all (--debug shows the traceback)"
    ]


@pytest.mark.slow
def test_each_trial_is_charged_by_the_device_its_rows_ran_on(four_devices):
    """4 metered cards (NVML test double, 100..400 W): every training window's energy per device goes
    to the trials on that device, split by their steps; a trial on the 400 W card pays 4x."""
    keys = four_devices["nvml_keys"]
    windows = four_devices["nvml_windows"]
    assert len(keys) == 4 and windows
    for w in windows:
        on = {k: [t for t in w["trials"] if t[1] == [k]] for k in keys}
        assert sum(len(v) for v in on.values()) == len(w["trials"])  # every trial on exactly one card
        for k, trials in on.items():
            if trials and sum(t[3] for t in trials):
                assert sum(t[2] for t in trials) == pytest.approx(w["per_device"][k], rel=1e-9)
        alone = {t[1][0]: t[2] for t in w["trials"] if len(on[t[1][0]]) == 1 and t[3] > 0}
        if keys[0] in alone and keys[3] in alone:
            assert alone[keys[3]] == pytest.approx(4 * alone[keys[0]], rel=0.05)
    first = windows[0]
    shared = [t for t in first["trials"] if t[1] == [keys[0]]]
    assert len(shared) == 2 and shared[0][2] == pytest.approx(shared[1][2])  # two trials, equal steps: equal shares


def test_attribute_by_device_groups_and_fallbacks():
    per = {"a": 10.0, "b": 30.0, "c": 5.0}
    shares, left = attribute_by_device(per, 45.0, [1, 1, 2], [("a",), ("b",), ("b",)])
    assert shares == pytest.approx([10.0, 10.0, 20.0]) and left == pytest.approx(5.0)  # card c ran nothing
    shares, left = attribute_by_device(per, 45.0, [1, 3], [("*",), ("*",)])  # a host meter: one group
    assert shares == pytest.approx([11.25, 33.75]) and left == 0.0
    shares, left = attribute_by_device(per, 45.0, [1, 1], [("a", "b"), ("b",)])  # overlapping: the total, by work
    assert shares == pytest.approx([22.5, 22.5]) and left == 0.0
    assert attribute_by_device(None, None, [1, 1], [("a",), ("b",)]) == ([None, None], None)


def _spec(**kw) -> StudySpec:
    space = SearchSpace(
        {
            "model": Categorical([{"name": "mlp", "hidden": [64]}, {"name": "mlp", "hidden": [16]}]),
            "learning_rate": LogUniform(1e-3, 1e-1, num=3),
            "batch_size": 32,
        }
    )
    base = dict(
        space=space.to_json(),
        mode="sh",
        min_budget=1,
        max_budget=9,
        eta=3,
        idle_seconds=0,
        probe_width=False,
        max_train_examples=640,
        max_val_examples=200,
        energy_method="estimated",
        steps_per_window=4,
    )
    return StudySpec(**{**base, **kw})


@pytest.mark.slow
def test_checkpointed_on_four_devices_resumes_on_two_with_the_same_decisions(tmp_path):
    spec = _spec()
    reference = _reference(tmp_path / "ref", spec)
    killed = tmp_path / "killed"
    Study(killed, spec, progress=False)  # writes spec.json
    kill_mid_phase(killed, env=_env(4), args=("--compile-cache", "off"))
    progress = json.loads((killed / "progress" / "phase-0.json").read_text())
    assert {r["devices"] for r in progress["runners"].values()} == {4}  # it ran on 4 devices
    assert all(r["width"] % 4 == 0 for r in progress["runners"].values())

    out = subprocess.run(
        [sys.executable, "-m", "sm2jax.cli", "resume", str(killed), "--no-progress", "--json", "--devices", "2"],
        env=_env(4),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    resumed = json.loads(out.stdout)
    assert resumed["attempts"] == 2
    assert _decisions(resumed) == _decisions(reference)
    assert resumed["selected"]["trial_id"] == reference["selected"]["trial_id"]
    assert resumed["selected"]["metric"] == pytest.approx(reference["selected"]["metric"], abs=1e-6)
    final = json.loads(max((killed / "progress").glob("phase-*.json"), key=lambda p: int(p.stem[6:])).read_text())
    assert {r["devices"] for r in final["runners"].values()} <= {2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(directory) -> list[subprocess.Popen]:
    """``sm2jax resume directory`` as processes 0 and 1 of one study (2 CPU devices each)."""
    port = _free_port()
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sm2jax.cli",
                "resume",
                str(directory),
                "--no-progress",
                "--json",
                "--compile-cache",
                "off",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


@pytest.mark.slow
def test_two_processes_run_one_study_with_one_ledger_and_one_result(tmp_path):
    spec = _spec(max_budget=3)
    reference = _reference(tmp_path / "ref", spec)
    shared = tmp_path / "shared"
    Study(shared, spec, progress=False)  # spec.json, as `sm2jax run` would write it
    procs = _two_processes(shared)
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(o[0][o[0].index("{") :]) for o in outs]
    assert results[0]["selected"]["trial_id"] == results[1]["selected"]["trial_id"] == reference["selected"]["trial_id"]
    assert _decisions(results[0]) == _decisions(results[1]) == _decisions(reference)
    written = json.loads((shared / "results.json").read_text())
    assert _decisions(written) == _decisions(reference)
    assert written["placement"]["processes"] == 2 and len(written["placement"]["devices"]) == 4
    for t in reference["trials"]:
        mine = next(x for x in written["trials"] if x["trial_id"] == t["trial_id"])
        assert mine["score"] == pytest.approx(t["score"], abs=1e-6)
    records = read_ledger(shared / "ledger.jsonl")
    windows = [r for r in records if r["type"] == "window"]
    ids = [w["window_id"] for w in windows]
    assert len(ids) == len(set(ids))  # one ledger, each window once: only process 0 wrote
    train = [w for w in windows if w["kind"] == "train"]
    assert train and all(set(w["per_device"]) == {"p0/cpu", "p1/cpu"} for w in train)  # both processes metered
    trials = [r for r in records if r["type"] == "trial" and r["kind"] == "train" and r["steps"] > 0]
    by_process = {tuple(r["device_keys"]) for r in trials}
    assert by_process == {("p0/cpu",), ("p1/cpu",)}  # trials spread over both hosts, each charged by its own
    for w in train:
        mine = [r for r in records if r["type"] == "trial" and r["window_id"] == w["window_id"]]
        for key in ("p0/cpu", "p1/cpu"):
            on = [r for r in mine if r["device_keys"] == [key]]
            if any(r["steps"] for r in on):
                assert sum(r["joules"] for r in on) == pytest.approx(w["per_device"][key], rel=1e-9)
    assert np.isfinite(written["total_joules"]) and written["total_joules"] > 0


@pytest.mark.slow
def test_two_processes_killed_mid_rung_resume_together(tmp_path):
    spec = _spec()
    reference = _reference(tmp_path / "ref", spec)
    shared = tmp_path / "shared"
    Study(shared, spec, progress=False)
    procs = _two_processes(shared)
    deadline = time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if any(r["phase"] == "rung-2" for r in read_ledger(shared / "ledger.jsonl")):
            for p in procs:
                p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    for p in procs:
        p.communicate(timeout=60)
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2
    assert not (shared / "progress" / "phase-2.json").exists()  # mid rung-2

    procs = _two_processes(shared)
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    for out, _ in outs:
        resumed = json.loads(out[out.index("{") :])
        assert resumed["attempts"] == 2
        assert _decisions(resumed) == _decisions(reference)
        assert resumed["selected"]["trial_id"] == reference["selected"]["trial_id"]
    assert {r.get("attempt") for r in read_ledger(shared / "ledger.jsonl")} == {
        1,
        2,
    }  # the killed attempt's energy is kept
