"""Benchmark: SM2 vs plain successive halving vs full-budget search, on identical work.

All three run the same search space, data, budgets and energy meter in one process, one after the
other (repeat with ``--repeats`` to see the noise). Printed and written (``--json``): each method's
selected accuracy, total energy (with its method label) and the energy ratio to full-budget search.

Run::

    python experiments/bench/sm2_vs_baselines.py --json results/sm2_vs_baselines.json

On a CPU-only machine energy is *estimated* from CPU time: the ratios show the work saved, not a
measured GPU saving. Expect SM2 and SH to use a fraction of full search's energy at similar accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import tempfile

from _results import write_rows

from sm2jax.presets import digits
from sm2jax.study import Study


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["sm2", "sh", "full"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for mode in args.modes:
                spec = dataclasses.replace(digits(quick=args.quick), mode=mode, idle_seconds=1.0)
                r = Study(pathlib.Path(tmp) / f"{mode}-{rep}", spec, progress=False).run()
                train_j = [g["joules"] for p, g in r["energy_by_phase"].items() if p != "compile"]
                rows.append({
                    "mode": mode, "repeat": rep, "accuracy": r["selected"]["metric"] if r["selected"] else None,
                    "total_joules": r["total_joules"], "training_joules": None if None in train_j else sum(train_j),
                    "compile_joules": r["energy_by_phase"]["compile"]["joules"], "energy_method": r["energy_method"],
                })
    full = {row["repeat"]: row for row in rows if row["mode"] == "full"}
    print(f"{'mode':<6} {'rep':>3} {'accuracy':>9} {'train J':>10} {'compile J':>10} {'train vs full':>14}  method")
    for row in rows:
        ref = full.get(row["repeat"])
        ratio = None if ref is None or not ref["training_joules"] or row["training_joules"] is None else row["training_joules"] / ref["training_joules"]
        row["training_energy_vs_full"] = ratio
        acc = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        tj = "unavailable" if row["training_joules"] is None else f"{row['training_joules']:.2f}"
        cj = "unavailable" if row["compile_joules"] is None else f"{row['compile_joules']:.1f}"
        print(f"{row['mode']:<6} {row['repeat']:>3} {acc:>9} {tj:>10} {cj:>10} {'n/a' if ratio is None else f'{ratio:.3f}x':>14}  {row['energy_method']}")
    write_rows(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
