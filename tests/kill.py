"""SIGKILL of a real ``sm2jax resume`` process in the middle of a phase (for the resume tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from sm2jax.energy import read_ledger


def kill_mid_phase(directory, *, env: dict | None = None, phase: str = "rung-2", args: tuple[str, ...] = ()) -> None:
    """Runs ``sm2jax resume directory`` and SIGKILLs it as soon as its ledger has a window of ``phase``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sm2jax.cli", "resume", str(directory), "--no-progress", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(r["phase"] == phase for r in read_ledger(os.path.join(directory, "ledger.jsonl"))):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
