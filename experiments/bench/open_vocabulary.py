"""Benchmark: a sampled space with optimizer, dropout and weight decay -- static vs traced, and vs Optuna.

96 configurations of an MLP 256x256 on MNIST-1D (5,000 samples, generated offline): optimizer in
{sgd, adam, adamw}, batch size in {32, 128}, learning rate log-uniform in [1e-4, 0.3], dropout uniform in
[0, 0.5], weight decay log-uniform in [1e-5, 1e-2]. Successive halving over 1, 3, 9 epochs (eta 3;
SM2 also explores a quarter epoch). Contenders, each in a fresh process with a cold compilation cache,
repeats interleaved (this machine is shared and noisy):

* ``static-sh``: today's treatment -- every value drawn independently (``sampler="random"``) and a
  model that takes dropout static (the built-in MLP registered without traced dropout), so each
  configuration's rate opens its own cohort, compiled cold;
* ``cohorts-sh``: cohort-aware Sobol' sampling (``sampler="sobol"``) with traced dropout: at most one
  cohort per (optimizer, batch size);
* ``cohorts-sm2``: the same, with SM2's exploration;
* ``optuna``: Optuna's TPE sampler with its ``SuccessiveHalvingPruner`` (min resource 1 epoch, reduction
  factor 3) over the same space and 96 trials, each trained by a competent jitted loop
  (``_plain.PlainRegularisedTrainer``: one ``lax.scan`` epoch per dispatch, learning rate, weight decay
  and dropout rate traced, so one program per optimizer and batch size).

Measured per run: wall seconds (process start to exit), CPU seconds, real XLA backend compiles
(JAX monitoring events), cohorts, epoch-trials trained, the selected configuration's validation and
test accuracy (test: held out, never used to select), and for sm2jax the study's energy (estimated
from process CPU time on a CPU: total, compilation, and training = exploration + rungs).

Run (about 10 minutes on a 2-core CPU with 1 repeat)::

    pip install -e '.[bench]'
    python experiments/bench/open_vocabulary.py --repeats 1 --json results/open_vocabulary.json --markdown results/open_vocabulary.md
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
CONTENDERS = ("static-sh", "cohorts-sh", "cohorts-sm2", "optuna")
NUM_CONFIGS = 96
MODEL = {"name": "mlp", "hidden": [256, 256]}
OPTIMIZERS = ["sgd", "adam", "adamw"]
BATCH_SIZES = [32, 128]
LR, DROPOUT, DECAY = (1e-4, 0.3), (0.0, 0.5), (1e-5, 1e-2)
MIN_EPOCHS, MAX_EPOCHS, ETA, EXPLORE = 1, 9, 3, 0.25
DATA = {"num_samples": 5000}


def _space(model: dict):
    from sm2jax.space import Categorical, LogUniform, SearchSpace, Uniform

    return SearchSpace(
        {
            "model": model,
            "optimizer": Categorical(OPTIMIZERS),
            "batch_size": Categorical(BATCH_SIZES),
            "learning_rate": LogUniform(*LR),
            "dropout": Uniform(*DROPOUT),
            "weight_decay": LogUniform(*DECAY),
        }
    )


def optuna_trial(trial, trainers: dict, ds, seed: int):
    """An Optuna trial's values of the space, suggested, and its trainer (one per optimizer and
    batch size, kept in ``trainers``), initial state and data-order generator."""
    import numpy as np
    from _plain import PlainRegularisedTrainer

    opt = trial.suggest_categorical("optimizer", OPTIMIZERS)
    bs = trial.suggest_categorical("batch_size", BATCH_SIZES)
    lr = trial.suggest_float("learning_rate", *LR, log=True)
    rate = trial.suggest_float("dropout", *DROPOUT)
    decay = trial.suggest_float("weight_decay", *DECAY, log=True)
    if (opt, bs) not in trainers:
        trainers[opt, bs] = PlainRegularisedTrainer(MODEL, ds, bs, opt)
    tr = trainers[opt, bs]
    return tr, tr.init(seed, trial.number, lr, decay, rate), np.random.default_rng(trial.number)


def _run_sm2jax(contender: str, ds, tmp: str) -> dict:
    from sm2jax.cohort import group_into_cohorts
    from sm2jax.energy import read_ledger
    from sm2jax.models import BUILTIN_MODELS, register_model
    from sm2jax.spec import StudySpec
    from sm2jax.study import Study

    treatment, mode = contender.split("-")
    model = MODEL
    if treatment == "static":  # the built-in MLP, registered without traced dropout: rates are static
        register_model("mlp-static-dropout", BUILTIN_MODELS["mlp"])
        model = {**MODEL, "name": "mlp-static-dropout"}
    spec = StudySpec(
        space=_space(model).to_json(),
        dataset="mnist1d",
        dataset_options=DATA,
        sampler="random" if treatment == "static" else "sobol",
        num_samples=NUM_CONFIGS,
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
    phases = results["energy_by_phase"]
    training = sum(v["joules"] for k, v in phases.items() if k == "explore" or k.startswith("rung-"))
    return {
        "accuracy": results["selected"]["metric"],
        "test_accuracy": results["selected"]["test"]["metric"],
        "selected": {
            k: results["selected"]["config"][k]
            for k in ("optimizer", "batch_size", "learning_rate", "dropout", "weight_decay")
        },
        "epoch_trials": samples / ds.num_train,
        "cohorts": len(group_into_cohorts(spec.configs())),
        "total_joules": results["total_joules"],
        "compile_joules": phases.get("compile", {}).get("joules", 0.0),
        "training_joules": training,
    }


def _run_optuna(ds) -> dict:
    import numpy as np
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trainers: dict = {}
    epochs, finished = [0], {}

    def objective(trial):
        tr, state, rng = optuna_trial(trial, trainers, ds, seed=0)
        acc = 0.0
        for epoch in range(1, MAX_EPOCHS + 1):
            state, _ = tr.epoch(state, rng)
            epochs[0] += 1
            acc = tr.accuracy(state)
            if not np.isfinite(acc):
                raise optuna.TrialPruned()
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        finished[trial.number] = (tr, state)
        return acc

    sampler = optuna.samplers.TPESampler(seed=0)
    pruner = optuna.pruners.SuccessiveHalvingPruner(
        min_resource=MIN_EPOCHS, reduction_factor=ETA, min_early_stopping_rate=0
    )
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    study.optimize(objective, n_trials=NUM_CONFIGS)
    tr, state = finished[study.best_trial.number]
    return {
        "accuracy": study.best_value,
        "test_accuracy": tr.accuracy(state, "test"),
        "selected": study.best_params,
        "epoch_trials": epochs[0],
        "cohorts": len(trainers),
    }


def child(contender: str) -> dict:
    """One contender, in this (fresh) process; prints one JSON line."""
    if contender != "optuna":
        from sm2jax.execute.placement import request_cpu_devices

        request_cpu_devices()  # as `sm2jax run` does: one host device per core (before JAX starts)
    from sm2jax.compile_cache import count_compiles
    from sm2jax.data import load_dataset

    with count_compiles() as tally, tempfile.TemporaryDirectory() as tmp:
        ds = load_dataset("mnist1d", **DATA)
        out = _run_optuna(ds) if contender == "optuna" else _run_sm2jax(contender, ds, tmp)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        **out,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "backend_compiles": tally.backend_compiles,
        "cache_hits": tally.cache_hits,
    }


# ------------------------------------------------------------------------------------ parent


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for contender in dict.fromkeys(r["contender"] for r in runs):
        mine = [r for r in runs if r["contender"] == contender]
        row = {"contender": contender, "runs": len(mine)}
        for key in ("wall_s", "cpu_s", "accuracy", "test_accuracy", "epoch_trials", "backend_compiles", "cohorts"):
            row[key] = statistics.median(r[key] for r in mine)
        for key in ("total_joules", "compile_joules", "training_joules"):
            if key in mine[0]:
                row[key] = statistics.median(r[key] for r in mine)
        rows.append(row)
    by = {r["contender"]: r for r in rows}
    for row in rows:
        if "optuna" in by:
            row["wall_vs_optuna"] = row["wall_s"] / by["optuna"]["wall_s"]
            row["cpu_vs_optuna"] = row["cpu_s"] / by["optuna"]["cpu_s"]
        if "static-sh" in by and "total_joules" in row:
            row["energy_vs_static"] = row["total_joules"] / by["static-sh"]["total_joules"]
    return rows


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def markdown(rows: list[dict]) -> str:
    nan = float("nan")
    lines = [
        "| contender | cohorts | XLA compiles | energy J total / compile / training [estimated] | energy vs static | wall s | CPU s | wall / Optuna's | CPU / Optuna's | epoch-trials | val acc | test acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        energy = (
            f"{r['total_joules']:.0f} / {r['compile_joules']:.0f} / {r['training_joules']:.0f}"
            if "total_joules" in r
            else "n/a"
        )
        lines.append(
            f"| {r['contender']} | {r['cohorts']:.0f} | {r['backend_compiles']:.0f} | {energy} | {_ratio(r.get('energy_vs_static'))} |"
            f" {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r.get('wall_vs_optuna', nan):.2f}x | {r.get('cpu_vs_optuna', nan):.2f}x |"
            f" {r['epoch_trials']:.0f} | {r['accuracy']:.3f} | {r['test_accuracy']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--markdown", type=pathlib.Path)
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return None
    sys.path.insert(0, str(HERE))
    from _results import rotated, run_child, write_rows, write_table

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for contender in rotated(args.contenders, rep):
                out, wall = run_child(__file__, [contender], cache=os.path.join(tmp, f"cache-{len(runs)}"))
                run = {"contender": contender, "wall_s": wall, **out}
                runs.append(run)
                print(
                    f"{contender:<12} wall {wall:6.1f} s  cpu {run['cpu_s']:6.1f} s  compiles {run['backend_compiles']:3d}"
                    f"  cohorts {run['cohorts']:3d}  epoch-trials {run['epoch_trials']:5.0f}"
                    f"  val {run['accuracy']:.3f}  test {run['test_accuracy']:.3f}  {run['selected']}",
                    flush=True,
                )
    rows = summarize(runs)
    write_table(args.markdown, markdown(rows))
    write_rows(args.json, [{"summary": rows, "runs": runs}])
    return rows


if __name__ == "__main__":
    main()
