"""Shared output of the benchmarks: a JSON list of rows."""

import json
import pathlib


def write_rows(path: pathlib.Path | None, rows: list[dict]) -> None:
    """Writes ``rows`` as indented JSON to ``path`` (parents created); nothing if ``path`` is None."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
