"""Benchmark: SM2 vs successive halving, Hyperband and full search on identical work.

Space (the issue's): MLP hidden [32] / [256, 256] / [1024, 1024] x batch 16 / 64 / 256 x 6 Adam
learning rates (54 configurations, 9 cohorts); SM2 explores for a quarter epoch; rungs at 1, 3, 9
epochs, eta 3; Hyperband with R = 9 epochs. Data: scikit-learn digits and MNIST-1D (5,000 samples,
generated offline with the ``mnist1d`` package's ``make_dataset``; never ``get_dataset``). Every
study of one (data set, seed) runs one after the other, each in a fresh process with the persistent
compile cache off, so every total includes its own cold compilation and ratios are side by side.

Per study: selected validation and test accuracy, total energy, energy without compilation, and the
ratio of the latter to SH's and to full search's. Energy is *estimated* from CPU time on a machine
without a GPU counter (say so; never compare it with measured figures).

Run (about 30 minutes on a 2-core CPU)::

    python experiments/bench/sm2_vs_baselines.py --json results/sm2_vs_baselines.json --table results/sm2_vs_baselines.md

``--data digits --seeds 0 --modes sm2 sh`` for a quick look; ``--seeds 0 0 0 --modes sm2`` runs three
identical SM2 studies (do they select the same configuration?).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from _results import write_rows, write_table

from sm2jax.data import load_dataset
from sm2jax.hyperband import run_hyperband
from sm2jax.space import Categorical, LogUniform, SearchSpace
from sm2jax.spec import StudySpec
from sm2jax.study import Study

MODELS = [
    {"name": "mlp", "hidden": [32]},
    {"name": "mlp", "hidden": [256, 256]},
    {"name": "mlp", "hidden": [1024, 1024]},
]
DATA = {"digits": ("digits", {}), "mnist1d": ("mnist1d", {"num_samples": 5000})}


def spec_for(data: str, seed: int, mode: str, **overrides) -> StudySpec:
    space = SearchSpace(
        {
            "model": Categorical(MODELS),
            "batch_size": Categorical([16, 64, 256]),
            "optimizer": "adam",
            "learning_rate": LogUniform(1e-4, 3e-2, num=6),
            "seed": seed,  # initialisation and data order
        }
    )
    name, options = DATA[data]
    return StudySpec(
        space=space.to_json(),
        dataset=name,
        dataset_options=options,
        seed=seed,
        mode="sh" if mode == "hyperband" else mode,
        explore_budget=0.25,
        min_budget=1,
        max_budget=9,
        eta=3,
        idle_seconds=0.0,
        energy_method="estimated",
        **overrides,
    )


def _training_joules(results: dict) -> float | None:
    phases = [g["joules"] for p, g in results["energy_by_phase"].items() if p != "compile"]
    return None if None in phases else float(sum(phases))


def run_one(directory: pathlib.Path, data: str, seed: int, mode: str, dataset) -> dict:
    spec = spec_for(data, seed, mode)
    t0 = time.perf_counter()
    if mode == "hyperband":
        r = run_hyperband(directory, spec, progress=False, dataset=dataset)
        subs = [json.loads((directory / f"bracket-{b['s']}" / "results.json").read_text()) for b in r["brackets"]]
        training = [_training_joules(s) for s in subs]
        training_j = None if None in training else sum(training)
    else:
        r = Study(directory, spec, progress=False, dataset=dataset).run()
        training_j = _training_joules(r)
    sel = r["selected"] or {}
    test = sel.get("test") or {}
    return {
        "data": data,
        "seed": seed,
        "mode": mode,
        "trial_id": sel.get("trial_id"),
        "config": sel.get("config"),
        "val_accuracy": sel.get("metric"),
        "test_accuracy": test.get("metric"),
        "total_joules": r["total_joules"],
        "training_joules": training_j,
        "energy_method": r["energy_method"],
        "wall_seconds": time.perf_counter() - t0,
    }


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def table(rows: list[dict]) -> str:
    def ratio(a, b):
        return None if a is None or not b else a / b

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = [
        "| data | mode | seeds | val acc | test acc | test acc - SH | total J | J w/o compile | vs SH | vs full | selected (per seed) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for data in dict.fromkeys(r["data"] for r in rows):
        mine = [r for r in rows if r["data"] == data]
        by = {(r["mode"], r["seed"]): r for r in mine}
        for mode in dict.fromkeys(r["mode"] for r in mine):
            rs = [r for r in mine if r["mode"] == mode]
            sh_ratio = _mean(
                [ratio(r["training_joules"], by.get(("sh", r["seed"]), {}).get("training_joules")) for r in rs]
            )
            full_ratio = _mean(
                [ratio(r["training_joules"], by.get(("full", r["seed"]), {}).get("training_joules")) for r in rs]
            )
            sh_test = _mean([by[("sh", r["seed"])]["test_accuracy"] for r in rs if ("sh", r["seed"]) in by])
            test = _mean([r["test_accuracy"] for r in rs])
            delta = None if test is None or sh_test is None else 100 * (test - sh_test)
            chosen = ", ".join(f"{r['trial_id']}" for r in rs)
            lines.append(
                f"| {data} | {mode} | {len(rs)} | {fmt(_mean([r['val_accuracy'] for r in rs]), '.4f')} | {fmt(test, '.4f')} | "
                f"{fmt(delta, '+.2f')} pt | {fmt(_mean([r['total_joules'] for r in rs]), ',.0f')} | {fmt(_mean([r['training_joules'] for r in rs]), ',.0f')} | "
                f"{fmt(sh_ratio, '.2f')}x | {fmt(full_ratio, '.2f')}x | {chosen} |"
            )
    methods = sorted({r["energy_method"] for r in rows if r["energy_method"]})
    lines.append("")
    lines.append(
        f"Energy: {', '.join(methods)} (means over seeds; ratios are per seed, then averaged; 'w/o compile' = exploration, rungs and evaluation)."
    )
    return "\n".join(lines)


def run_in_process(directory: pathlib.Path, data: str, seed: int, mode: str) -> dict:
    """One study in a fresh Python process (cold programs, cache off); returns its row."""
    env = {**os.environ, "SM2JAX_COMPILE_CACHE": "off"}
    cmd = [sys.executable, __file__, "--one", str(directory), data, str(seed), mode]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{data} seed {seed} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--one":
        directory, data, seed, mode = sys.argv[2:6]
        name, options = DATA[data]
        print(json.dumps(run_one(pathlib.Path(directory), data, int(seed), mode, load_dataset(name, **options))))
        return None
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=list(DATA), choices=list(DATA))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--modes", nargs="+", default=["sm2", "sh", "hyperband", "full"], choices=["sm2", "sh", "hyperband", "full"]
    )
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--table", type=pathlib.Path)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.data:
            for i, seed in enumerate(args.seeds):
                for mode in args.modes:
                    row = run_in_process(pathlib.Path(tmp) / f"{data}-{i}-{mode}", data, seed, mode)
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
                    write_rows(args.json, rows)
    write_table(args.table, table(rows))
    return rows


if __name__ == "__main__":
    main()
