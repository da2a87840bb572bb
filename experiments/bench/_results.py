"""Shared output of the benchmarks: a JSON list of rows and a markdown table."""

import json
import pathlib


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
