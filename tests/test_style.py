"""The tree follows the lint and format rules in pyproject.toml (ruff)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ruff(*args):
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff_lint_and_format_are_clean():
    lint = _ruff("check", "sm2jax", "tests", "experiments")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = _ruff("format", "--check", "sm2jax", "tests", "experiments")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
