"""Benchmark: a whole study end to end, sm2jax vs Optuna vs a plain loop, on identical work.

Contenders, each in a fresh process (cold: an empty persistent compilation cache for sm2jax, JAX's
default of none for the others), repeats interleaved because this machine is shared and noisy:

* ``sm2jax-sh``, ``sm2jax-sm2``, ``sm2jax-full``: :class:`sm2jax.Study` in that mode;
* ``optuna``: Optuna's ``GridSampler`` over the same grid with its ``SuccessiveHalvingPruner``
  (min resource 1 epoch, reduction factor 3), each trial trained by a competent jitted loop
  (``_plain.PlainTrainer``: one ``lax.scan`` epoch per dispatch, learning rate traced so trials of one
  batch size share a program), validation accuracy reported every epoch;
* ``loop``: the same jitted loop, every configuration to the full budget, the best one kept.

Same search space, model, data split and budgets (rungs at 1, 3, 9 epochs, eta 3; SM2 also explores
a quarter epoch). Measured per run: wall seconds (process start to exit, imports included), CPU
seconds (user + system of the process), real XLA backend compiles (JAX monitoring events, cache hits
excluded), epoch-trials trained, and the selected configuration's validation accuracy.

Workloads: ``digits`` (the preset: MLP [64], 6 learning rates x batch 16/64/256), ``mnist1d-5k`` and
``mnist1d-50k`` (MNIST-1D from the ``mnist1d`` package's offline ``make_dataset``, MLP 256x256,
6 learning rates x batch 32/128; 50,000 samples make a training-bound study on a 2-core CPU).

Run (about 15 minutes on a 2-core CPU with 2 repeats)::

    pip install -e '.[bench]'
    python experiments/bench/vs_optuna.py --repeats 2 --json results/vs_optuna.json --markdown results/vs_optuna.md
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
CONTENDERS = ("sm2jax-sh", "sm2jax-sm2", "sm2jax-full", "optuna", "loop")
WORKLOADS = {
    "digits": {
        "data": ("digits", {}),
        "model": {"name": "mlp", "hidden": [64]},
        "lr": (1e-4, 1.0),
        "batch_sizes": [16, 64, 256],
    },
    "mnist1d-5k": {
        "data": ("mnist1d", {"num_samples": 5000}),
        "model": {"name": "mlp", "hidden": [256, 256]},
        "lr": (1e-4, 1e-1),
        "batch_sizes": [32, 128],
    },
    "mnist1d-50k": {
        "data": ("mnist1d", {"num_samples": 50000}),
        "model": {"name": "mlp", "hidden": [256, 256]},
        "lr": (1e-4, 1e-1),
        "batch_sizes": [32, 128],
    },
}
MIN_EPOCHS, MAX_EPOCHS, ETA, EXPLORE = 1, 9, 3, 0.25


def _grid(workload: dict) -> list[float]:
    from sm2jax.space import LogUniform

    lo, hi = workload["lr"]
    return LogUniform(lo, hi, num=6).grid()


def _load(path: str):
    import numpy as np

    from sm2jax.data import ArrayDataset

    with np.load(path) as z:
        return ArrayDataset(
            str(z["name"]), "classification", z["x_train"], z["y_train"], z["x_val"], z["y_val"], int(z["num_outputs"])
        )


# ------------------------------------------------------------------------------------ contenders


def _run_sm2jax(mode: str, workload: dict, ds, tmp: str) -> dict:
    from sm2jax.energy import read_ledger
    from sm2jax.space import Categorical, SearchSpace
    from sm2jax.spec import StudySpec
    from sm2jax.study import Study

    space = SearchSpace(
        {
            "model": workload["model"],
            "learning_rate": Categorical(_grid(workload)),
            "batch_size": Categorical(workload["batch_sizes"]),
        }
    )
    spec = StudySpec(
        space=space.to_json(),
        dataset=ds.name,
        mode=mode,
        explore_budget=EXPLORE,
        min_budget=MIN_EPOCHS,
        max_budget=MAX_EPOCHS,
        eta=ETA,
        idle_seconds=0.0,
        energy_method="estimated",
    )
    results = Study(os.path.join(tmp, "study"), spec, dataset=ds, progress=False).run()
    samples = sum(
        r["samples"]
        for r in read_ledger(os.path.join(tmp, "study", "ledger.jsonl"))
        if r["type"] == "trial" and r["phase"] != "probe"
    )
    widths = {name: hw["choices"][-1]["width"] for name, hw in results["hardware"].items() if hw.get("choices")}
    return {"accuracy": results["selected"]["metric"], "epoch_trials": samples / ds.num_train, "widths": widths}


def _run_optuna(workload: dict, ds) -> dict:
    import numpy as np
    import optuna
    from _plain import PlainTrainer

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    lrs, bss = _grid(workload), workload["batch_sizes"]
    trainers = {bs: PlainTrainer(workload["model"], ds, bs) for bs in bss}
    epochs = [0]

    def objective(trial):
        lr = trial.suggest_categorical("learning_rate", lrs)
        bs = trial.suggest_categorical("batch_size", bss)
        tr = trainers[bs]
        state, rng = tr.init(0, trial.number, lr), np.random.default_rng(trial.number)
        acc = 0.0
        for epoch in range(1, MAX_EPOCHS + 1):
            state, _ = tr.epoch(state, rng)
            epochs[0] += 1
            acc = tr.accuracy(state)
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return acc

    sampler = optuna.samplers.GridSampler({"learning_rate": lrs, "batch_size": bss}, seed=0)
    pruner = optuna.pruners.SuccessiveHalvingPruner(
        min_resource=MIN_EPOCHS, reduction_factor=ETA, min_early_stopping_rate=0
    )
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    study.optimize(objective, n_trials=len(lrs) * len(bss))
    return {"accuracy": study.best_value, "epoch_trials": epochs[0]}


def _run_loop(workload: dict, ds) -> dict:
    import numpy as np
    from _plain import PlainTrainer

    best, epochs, number = -1.0, 0, 0
    for bs in workload["batch_sizes"]:
        tr = PlainTrainer(workload["model"], ds, bs)
        for lr in _grid(workload):
            state, rng = tr.init(0, number, lr), np.random.default_rng(number)
            for _ in range(MAX_EPOCHS):
                state, _ = tr.epoch(state, rng)
                epochs += 1
            best = max(best, tr.accuracy(state))
            number += 1
    return {"accuracy": best, "epoch_trials": epochs}


def child(contender: str, workload_name: str, data: str) -> dict:
    """One contender, in this (fresh) process; prints one JSON line."""
    if contender.startswith("sm2jax-"):
        from sm2jax.execute.placement import request_cpu_devices

        request_cpu_devices()  # as `sm2jax run` does: one host device per core (before JAX starts)
    from sm2jax.compile_cache import count_compiles

    with count_compiles() as tally, tempfile.TemporaryDirectory() as tmp:
        ds = _load(data)
        workload = WORKLOADS[workload_name]
        if contender.startswith("sm2jax-"):
            out = _run_sm2jax(contender.split("-", 1)[1], workload, ds, tmp)
        elif contender == "optuna":
            out = _run_optuna(workload, ds)
        else:
            out = _run_loop(workload, ds)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        **out,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "backend_compiles": tally.backend_compiles,
        "cache_hits": tally.cache_hits,
    }


# ------------------------------------------------------------------------------------ parent


def _prepare(name: str, tmp: str) -> str:
    import numpy as np

    from sm2jax.data import load_dataset

    kind, options = WORKLOADS[name]["data"]
    ds = load_dataset(kind, **options)
    path = os.path.join(tmp, f"{name}.npz")
    np.savez(
        path,
        name=ds.name,
        x_train=ds.x_train,
        y_train=ds.y_train,
        x_val=ds.x_val,
        y_val=ds.y_val,
        num_outputs=ds.num_outputs,
    )
    return path


def _one(contender: str, workload: str, data: str, tmp: str, run_id: int) -> dict:
    from _results import run_child

    out, wall = run_child(
        __file__, [contender, "--workload", workload, "--data", data], cache=os.path.join(tmp, f"cache-{run_id}")
    )
    return {"contender": contender, "workload": workload, "wall_s": wall, **out}


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for workload in dict.fromkeys(r["workload"] for r in runs):
        for contender in dict.fromkeys(r["contender"] for r in runs):
            mine = [r for r in runs if r["workload"] == workload and r["contender"] == contender]
            if not mine:
                continue
            row = {"workload": workload, "contender": contender, "runs": len(mine)}
            for key in ("wall_s", "cpu_s"):
                values = [r[key] for r in mine]
                row[f"{key}_min"], row[f"{key}_median"] = min(values), statistics.median(values)
            row["backend_compiles"] = max(r["backend_compiles"] for r in mine)
            row["accuracy"] = statistics.median(r["accuracy"] for r in mine)
            row["epoch_trials"] = statistics.median(r["epoch_trials"] for r in mine)
            rows.append(row)
    for row in rows:  # ratios against the Optuna contender and the plain loop, same workload
        for peer in ("optuna", "loop"):
            ref = next((r for r in rows if r["workload"] == row["workload"] and r["contender"] == peer), None)
            if ref is not None:
                row[f"speedup_vs_{peer}"] = ref["wall_s_median"] / row["wall_s_median"]
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| workload | contender | wall s (min / median) | CPU s (median) | XLA compiles | epoch-trials | selected accuracy | wall speed-up vs Optuna | vs loop |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['contender']} | {r['wall_s_min']:.1f} / {r['wall_s_median']:.1f} | {r['cpu_s_median']:.1f} | {r['backend_compiles']} |"
            f" {r['epoch_trials']:.0f} | {r['accuracy']:.3f} | {r.get('speedup_vs_optuna', float('nan')):.2f}x | {r.get('speedup_vs_loop', float('nan')):.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--markdown", type=pathlib.Path)
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.workload, args.data)))
        return None
    sys.path.insert(0, str(HERE))
    from _results import rotated, write_rows, write_table

    runs, run_id = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads:
            data = _prepare(workload, tmp)
            for rep in range(args.repeats):
                for contender in rotated(args.contenders, rep):
                    run = _one(contender, workload, data, tmp, run_id)
                    run_id += 1
                    runs.append(run)
                    print(
                        f"{workload:<12} {contender:<12} wall {run['wall_s']:6.1f} s  cpu {run['cpu_s']:6.1f} s  compiles {run['backend_compiles']:3d}"
                        f"  epoch-trials {run['epoch_trials']:5.0f}  accuracy {run['accuracy']:.3f}",
                        flush=True,
                    )
    rows = summarize(runs)
    write_table(args.markdown, markdown(rows))
    write_rows(args.json, [{"summary": rows, "runs": runs}])
    return rows


if __name__ == "__main__":
    main()
