"""Benchmark: does the search learn? sm2jax TPE rounds vs sm2jax Sobol' vs Optuna's TPE, 5 seeds.

The open-vocabulary MNIST-1D space (``open_vocabulary.py``: MLP 256x256; optimizer in {sgd, adam,
adamw}, batch size in {32, 128}, learning rate log-uniform in [1e-4, 0.3], dropout uniform in [0, 0.5],
weight decay log-uniform in [1e-5, 1e-2]), successive halving over 1, 3, 9 epochs (eta 3; SM2 also
explores a quarter epoch), the same number of configurations for every contender (``--configs``,
96 by default, as ``open_vocabulary.py``). Contenders, each seed in a fresh process with a cold compilation cache, seeds and
contenders interleaved (this machine is shared and noisy):

* ``tpe-sh`` / ``tpe-sm2``: ``sampler="tpe"`` over ``--rounds`` rounds (4): round 1 is Sobol', each
  later round is proposed by Optuna's TPE fitted on every result so far, batched per cohort;
* ``sobol-sh``: today's blind search, every configuration drawn at the start (cohort-aware Sobol');
* ``optuna``: Optuna's TPE sampler with its ``SuccessiveHalvingPruner`` (min resource 1 epoch,
  reduction factor 3) over the same space and number of trials, each trained by a competent jitted
  loop (``_plain.PlainRegularisedTrainer``: one ``lax.scan`` epoch per dispatch).

A selection's *quality* is judged as the ground truths say (one run's test accuracy on MNIST-1D 5k
carries 2-3.5 points of seed noise): each contender's pick is retrained from scratch over
``--retrain`` seeds (10) by the same plain loop, for the full 9 epochs, and its mean test accuracy is
the pick's quality. Reported per contender over the seeds: mean and worst quality, the seed-to-seed
spread, the selection's own test accuracy, CPU seconds of the whole process, and training energy
(*estimated* for every contender alike, from CPU time: sm2jax's exploration + rungs, Optuna's epochs
x the same 10 W per core). Figures: best validation accuracy so far against CPU seconds and against
training energy, one line per contender and seed.

Run (about 13 minutes on a 2-core CPU)::

    pip install -e '.[bench]'
    python experiments/bench/search_quality.py --json results/search_quality.json --markdown results/search_quality.md --figure results/search_quality.png
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
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from open_vocabulary import (  # noqa: E402
    DATA,
    ETA,
    EXPLORE,
    MAX_EPOCHS,
    MIN_EPOCHS,
    MODEL,
    _space,
    optuna_trial,
)

CONTENDERS = ("tpe-sh", "tpe-sm2", "sobol-sh", "optuna")
WATTS_PER_CORE = 10.0  # sm2jax's estimated meter's default: Optuna's CPU time is converted alike
KEYS = ("optimizer", "batch_size", "learning_rate", "dropout", "weight_decay")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run_sm2jax(contender: str, seed: int, configs: int, rounds: int, ds, tmp: str) -> dict:
    from sm2jax.spec import StudySpec
    from sm2jax.store.folder import StudyDir
    from sm2jax.study import Study

    sampler, mode = contender.split("-")
    spec = StudySpec(
        space=_space(MODEL).to_json(),
        dataset="mnist1d",
        dataset_options=DATA,
        sampler=sampler,
        num_samples=configs,
        rounds=rounds if sampler == "tpe" else 1,
        seed=seed,
        mode=mode,
        explore_budget=EXPLORE,
        min_budget=MIN_EPOCHS,
        max_budget=MAX_EPOCHS,
        eta=ETA,
        idle_seconds=0.0,
        energy_method="estimated",
    )
    trace: list[list[float]] = []  # [cpu s, training joules so far, best validation so far] per phase
    commit = StudyDir.commit_phase

    def traced(folder, phase, progress, *args, **kwargs):  # the store seam: one point per committed phase
        commit(folder, phase, progress, *args, **kwargs)
        scores = [v[1] for c in progress["curves"].values() for v in c.get("val", []) if v[1] is not None]
        joules = sum(h["joules"] or 0.0 for hs in progress["cohort_energy"].values() for h in hs)
        trace.append([_cpu(), joules, max(scores, default=0.0)])

    StudyDir.commit_phase = traced
    results = Study(os.path.join(tmp, "study"), spec, dataset=ds, progress=False).run()
    training = sum(v["joules"] for k, v in results["energy_by_phase"].items() if k not in ("compile", "probe"))
    return {
        "accuracy": results["selected"]["metric"],
        "test_accuracy": results["selected"]["test"]["metric"],
        "selected": {k: results["selected"]["config"][k] for k in KEYS},
        "configs": results["num_configs"],
        "training_joules": training,
        "trace": trace,
    }


def _run_optuna(seed: int, configs: int, ds) -> dict:
    import numpy as np
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trainers: dict = {}
    finished, trace, training = {}, [], [0.0]

    def objective(trial):
        tr, state, rng = optuna_trial(trial, trainers, ds, seed)
        acc = 0.0
        for epoch in range(1, MAX_EPOCHS + 1):
            start = _cpu()
            state, _ = tr.epoch(state, rng)
            acc = tr.accuracy(state)  # (blocks on the epoch: its CPU time is all in)
            training[0] += (_cpu() - start) * WATTS_PER_CORE
            best = max(acc if np.isfinite(acc) else 0.0, trace[-1][2] if trace else 0.0)
            trace.append([_cpu(), training[0], best])
            if not np.isfinite(acc):
                raise optuna.TrialPruned()
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        finished[trial.number] = (tr, state)
        return acc

    sampler = optuna.samplers.TPESampler(seed=seed)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=MIN_EPOCHS, reduction_factor=ETA)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    study.optimize(objective, n_trials=configs)
    tr, state = finished[study.best_trial.number]
    return {
        "accuracy": study.best_value,
        "test_accuracy": tr.accuracy(state, "test"),
        "selected": study.best_params,
        "configs": configs,
        "training_joules": training[0],
        "trace": trace,
    }


def child(contender: str, seed: int, configs: int, rounds: int) -> dict:
    """One contender and seed, in this (fresh) process."""
    if contender != "optuna":
        from sm2jax.execute.placement import request_cpu_devices

        request_cpu_devices()  # as `sm2jax run` does: one host device per core (before JAX starts)
    from sm2jax.data import load_dataset

    with tempfile.TemporaryDirectory() as tmp:
        ds = load_dataset("mnist1d", **DATA)
        if contender == "optuna":
            out = _run_optuna(seed, configs, ds)
        else:
            out = _run_sm2jax(contender, seed, configs, rounds, ds, tmp)
    return {**out, "cpu_s": _cpu()}


def retrain(picks: list[dict], seeds: int) -> list[float]:
    """Each pick's quality: its mean test accuracy over ``seeds`` retrainings from scratch (9 epochs)."""
    import numpy as np
    from _plain import PlainRegularisedTrainer

    from sm2jax.data import load_dataset

    ds, trainers, out = load_dataset("mnist1d", **DATA), {}, []
    for pick in picks:
        key = (pick["optimizer"], int(pick["batch_size"]))
        tr = trainers.setdefault(key, PlainRegularisedTrainer(MODEL, ds, key[1], key[0]))
        accs = []
        for s in range(seeds):
            state = tr.init(1000 + s, s, pick["learning_rate"], pick["weight_decay"], pick["dropout"])
            rng = np.random.default_rng(1000 + s)
            for _ in range(MAX_EPOCHS):
                state, _ = tr.epoch(state, rng)
            acc = tr.accuracy(state, "test")
            accs.append(acc if np.isfinite(acc) else 0.0)
        out.append(float(np.mean(accs)))
    return out


# ------------------------------------------------------------------------------------ parent


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for contender in dict.fromkeys(r["contender"] for r in runs):
        mine = [r for r in runs if r["contender"] == contender]
        quality = [r["quality"] for r in mine]
        rows.append(
            {
                "contender": contender,
                "seeds": len(mine),
                "quality_mean": statistics.mean(quality),
                "quality_worst": min(quality),
                "quality_sd": statistics.stdev(quality) if len(quality) > 1 else 0.0,
                "selection_test_mean": statistics.mean(r["test_accuracy"] for r in mine),
                "cpu_s": statistics.mean(r["cpu_s"] for r in mine),
                "training_joules": statistics.mean(r["training_joules"] for r in mine),
            }
        )
    by = {r["contender"]: r for r in rows}
    for row in rows:
        for other in ("optuna", "sobol-sh"):
            if other in by:
                row[f"cpu_vs_{other}"] = row["cpu_s"] / by[other]["cpu_s"]
                row[f"energy_vs_{other}"] = row["training_joules"] / by[other]["training_joules"]
                se = (row["quality_sd"] ** 2 / row["seeds"] + by[other]["quality_sd"] ** 2 / by[other]["seeds"]) ** 0.5
                row[f"quality_minus_{other}"] = row["quality_mean"] - by[other]["quality_mean"]
                row[f"quality_se_vs_{other}"] = se
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| contender | seeds | quality: mean test acc of the pick retrained x10 (mean / worst / sd over seeds) | vs Optuna (points, +- se) | vs Sobol' SH (points, +- se) | selection's own test acc | CPU s | CPU / Optuna's | training J [estimated] | training / Sobol' SH's |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    pts = lambda r, o: (
        f"{100 * r[f'quality_minus_{o}']:+.2f} +- {100 * r[f'quality_se_vs_{o}']:.2f}"
        if f"quality_minus_{o}" in r
        else "n/a"
    )
    for r in rows:
        lines.append(
            f"| {r['contender']} | {r['seeds']} | {r['quality_mean']:.4f} / {r['quality_worst']:.4f} / {r['quality_sd']:.4f}"
            f" | {pts(r, 'optuna')} | {pts(r, 'sobol-sh')} | {r['selection_test_mean']:.4f} | {r['cpu_s']:.0f}"
            f" | {r.get('cpu_vs_optuna', float('nan')):.2f}x | {r['training_joules']:.0f} | {r.get('energy_vs_sobol-sh', float('nan')):.2f}x |"
        )
    return "\n".join(lines)


def figure(runs: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = dict(zip(CONTENDERS, ("tab:blue", "tab:green", "tab:orange", "tab:red")))
    for r in runs:
        xs = [p[0] for p in r["trace"]], [p[1] for p in r["trace"]]
        ys = [p[2] for p in r["trace"]]
        for ax, x in zip(axes, xs):
            first = r["seed"] == min(q["seed"] for q in runs)
            ax.step(
                x, ys, where="post", color=colours[r["contender"]], alpha=0.7, label=r["contender"] if first else None
            )
    for ax, label in zip(axes, ("CPU seconds of the process", "training energy so far, J [estimated from CPU time]")):
        ax.set_xlabel(label)
        ax.set_ylabel("best validation accuracy so far")
        ax.set_ylim(0.3, None)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--configs", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--retrain", type=int, default=10)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--markdown", type=pathlib.Path)
    parser.add_argument("--figure", type=pathlib.Path)
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.seed, args.configs, args.rounds)))
        return None
    from _results import rotated, run_child, write_rows, write_table

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for contender in rotated(args.contenders, seed):
                child_args = [
                    contender,
                    "--seed",
                    str(seed),
                    "--configs",
                    str(args.configs),
                    "--rounds",
                    str(args.rounds),
                ]
                out, wall = run_child(__file__, child_args, cache=os.path.join(tmp, f"cache-{len(runs)}"))
                runs.append({"contender": contender, "seed": seed, "wall_s": wall, **out})
                print(
                    f"seed {seed} {contender:<9} cpu {out['cpu_s']:6.1f} s  training {out['training_joules']:7.0f} J"
                    f"  val {out['accuracy']:.3f}  test {out['test_accuracy']:.3f}  {out['selected']}",
                    flush=True,
                )
    start = time.perf_counter()
    for run, quality in zip(runs, retrain([r["selected"] for r in runs], args.retrain)):
        run["quality"] = quality
    print(f"retrained {len(runs)} picks x {args.retrain} seeds in {time.perf_counter() - start:.0f} s", flush=True)
    rows = summarize(runs)
    write_table(args.markdown, markdown(rows))
    write_rows(args.json, [{"summary": rows, "runs": runs}])
    if args.figure:
        figure(runs, args.figure)
    return rows


if __name__ == "__main__":
    main()
