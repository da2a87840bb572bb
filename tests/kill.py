"""SIGKILL of a real ``sm2jax resume`` process in the middle of a phase (for the resume tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from sm2jax.energy import read_ledger


def kill_mid_phase(directory, *, env: dict | None = None, phase: str = "rung-2", args: tuple[str, ...] = ()) -> None:
    """Runs ``sm2jax resume directory`` and SIGKILLs it as soon as its ledger has a window of
    ``phase`` written by this run (an attempt after those already there), and checks that the kill
    landed before the phase was committed (studies that are killed this way train in short windows,
    ``steps_per_window``, so that a phase lasts many ledger writes even on a loaded machine)."""
    ledger = os.path.join(directory, "ledger.jsonl")
    earlier = max((r.get("attempt", 0) for r in read_ledger(ledger)), default=0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sm2jax.cli", "resume", str(directory), "--no-progress", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(r["phase"] == phase and r.get("attempt", 0) > earlier for r in read_ledger(ledger)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    progress = os.path.join(directory, "progress")
    for name in os.listdir(progress) if os.path.isdir(progress) else []:
        if name.endswith(".json"):
            with open(os.path.join(progress, name)) as f:
                done = json.load(f).get("completed_by", {})
            assert phase not in done, f"the kill landed after {phase} was committed ({name}): not a kill mid-phase"
