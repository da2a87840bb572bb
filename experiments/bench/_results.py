"""Shared parts of the benchmarks: cold child processes, interleaved repeats, JSON rows and a markdown table."""

import json
import os
import pathlib
import subprocess
import sys
import time


def write_rows(path: pathlib.Path | None, rows: list[dict]) -> None:
    """Writes ``rows`` as indented JSON to ``path`` (parents created); nothing if ``path`` is None."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))


def write_table(path: pathlib.Path | None, table: str) -> None:
    """Prints the markdown ``table`` and writes it to ``path`` (parents created) if given."""
    print(table)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table + "\n")


def rotated(items, rep: int) -> list:
    """``items`` rotated by ``rep``: interleaved repeats where no contender always runs first."""
    items = list(items)
    return items[rep % len(items) :] + items[: rep % len(items)]


def run_child(script: str, args: list[str], *, cache: str) -> tuple[dict, float]:
    """Runs ``python script --child ARGS`` in a fresh, cold process: JAX's own cache setting is
    dropped and ``SM2JAX_COMPILE_CACHE`` is ``cache`` (a new folder, or ``off``); the benchmark's
    folder is on its path. Returns the JSON of its last line of output and its wall seconds (process
    start to exit, imports included); raises with the tail of its errors if it fails."""
    here = str(pathlib.Path(script).resolve().parent)
    env = {
        **os.environ,
        "SM2JAX_COMPILE_CACHE": cache,
        "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, script, "--child", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall
