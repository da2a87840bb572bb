"""Benchmark: a cohort at its probed vmap width vs a sequential loop of single-trial jitted steps.

Both sides run the same configurations, the same per-trial batches and the same step code
(:class:`sm2jax.trainer.CohortTrainer`); only the execution differs:

* ``loop``: for every step, for every trial, one dispatch of a jitted single-trial step;
* ``cohort``: one dispatch runs all K trials for ``--steps`` steps at the width chosen by
  :meth:`CohortTrainer.probe_width`.

Compilation is excluded from both. The two are timed alternately (``--repeats`` rounds, best of
each) because this machine is shared and noisy; the ratio is what to read.

Run::

    python experiments/bench/vmap_vs_loop.py --json results/vmap_vs_loop.json

Expected on a 2-core CPU: >= 3x for the digits MLP (16 trials), ~1x for the wide MLP where the
probe falls back to narrow widths.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax

from _results import write_rows

from sm2jax.cohort import group_into_cohorts
from sm2jax.data import load_digits
from sm2jax.space import LogUniform, SearchSpace
from sm2jax.trainer import CohortTrainer

MODELS = {
    "mlp-64": {"name": "mlp", "hidden": [64]},
    "mlp-256x2": {"name": "mlp", "hidden": [256, 256]},
    "mlp-1024x2": {"name": "mlp", "hidden": [1024, 1024]},
}


def _time(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def bench(model_name: str, trials: int, batch_size: int, steps: int, repeats: int) -> dict:
    ds = load_digits()
    space = SearchSpace({"model": MODELS[model_name], "learning_rate": LogUniform(1e-4, 1e-1, num=trials), "batch_size": batch_size})
    (cohort,) = group_into_cohorts(space.grid())

    cohort_trainer = CohortTrainer(cohort, ds, schedule_steps=10 * steps)
    state = cohort_trainer.init()
    probe = cohort_trainer.probe_width(state, steps=max(4, steps // 4))

    singles = [CohortTrainer(cohort.subset([i]), ds, schedule_steps=10 * steps) for i in range(trials)]
    single_states = [t.init() for t in singles]
    # Each single-trial trainer holds its own compiled program: compile all outside the timing.
    for trainer, single in zip(singles, single_states):
        jax.block_until_ready(trainer.train(single, 1))

    def run_loop():
        states = list(single_states)
        for _ in range(steps):
            for i, trainer in enumerate(singles):
                states[i], _ = trainer.train(states[i], 1)
        return states

    def run_cohort():
        return cohort_trainer.train(state, steps)

    jax.block_until_ready(run_cohort())  # compile at the chosen width
    loop_s, cohort_s = float("inf"), float("inf")
    for _ in range(repeats):
        loop_s = min(loop_s, _time(run_loop))
        cohort_s = min(cohort_s, _time(run_cohort))
    samples = trials * steps * batch_size
    return {
        "model": model_name, "trials": trials, "batch_size": batch_size, "steps": steps,
        "width": probe.chosen, "probe": probe.to_json(),
        "loop_samples_per_s": samples / loop_s, "cohort_samples_per_s": samples / cohort_s,
        "speedup": loop_s / cohort_s, "backend": jax.default_backend(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=pathlib.Path, help="write the rows here")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'model':<12} {'trials':>6} {'width':>5} {'loop samples/s':>15} {'cohort samples/s':>17} {'speedup':>8}")
    for name in args.models:
        row = bench(name, args.trials, args.batch_size, args.steps, args.repeats)
        rows.append(row)
        print(f"{row['model']:<12} {row['trials']:>6} {row['width']:>5} {row['loop_samples_per_s']:>15.0f} {row['cohort_samples_per_s']:>17.0f} {row['speedup']:>7.2f}x")
    write_rows(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
