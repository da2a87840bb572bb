"""Benchmark: training a cohort at the width sm2jax chooses vs sequential per-trial loops.

All sides train the same K configurations for the same number of epochs on the same data:

* ``loop-epochs`` (the strongest sequential baseline): for every trial, one dispatch per epoch of a
  jitted ``lax.scan`` over its batches (``_plain.PlainTrainer``: plain Adam, learning rate traced so
  all trials share the program, host-side numpy shuffling);
* ``loop-steps``: for every step, for every trial, one dispatch of sm2jax's own single-trial program
  (the naive loop; shows what dispatch amortisation is worth);
* ``cohort``: sm2jax's chunks at the width its probe chooses among :func:`sm2jax.execute.width_policy.probe_candidates`
  (ceil(K / width) dispatches of one width-wide program for all the steps), on one device;
* ``cohort-all-devices``: the same over every device's ``trials`` axis (on a CPU, one XLA host device
  per core, what ``sm2jax run`` uses), widths multiples of the device count.

Compilation is excluded from all sides. They are timed alternately (``--repeats`` rounds, best of
each) because this machine is shared and noisy; the ratios are what to read. The acceptance bar is
``cohort / loop-epochs >= 0.95`` on every model size: the width choice never trains slower than the
strongest sequential loop.

Run::

    python experiments/bench/vmap_vs_loop.py --json results/vmap_vs_loop.json --markdown results/vmap_vs_loop.md
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import numpy as np
from _plain import PlainTrainer
from _results import write_rows, write_table

from sm2jax.cohort import group_into_cohorts
from sm2jax.data import load_digits
from sm2jax.execute.placement import Placement, request_cpu_devices
from sm2jax.execute.rows import chunk_rows
from sm2jax.execute.trainer import CohortTrainer
from sm2jax.execute.width_policy import probe_candidates
from sm2jax.space import LogUniform, SearchSpace

MODELS = {
    "mlp-64": {"name": "mlp", "hidden": [64]},
    "mlp-256x2": {"name": "mlp", "hidden": [256, 256]},
    "mlp-1024x2": {"name": "mlp", "hidden": [1024, 1024]},
}


def _time(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def bench(model_name: str, trials: int, batch_size: int, epochs: int, repeats: int) -> dict:
    ds = load_digits()
    space = SearchSpace(
        {"model": MODELS[model_name], "learning_rate": LogUniform(1e-4, 1e-1, num=trials), "batch_size": batch_size}
    )
    configs = space.grid()
    (cohort,) = group_into_cohorts(configs)
    trainer = CohortTrainer(cohort, ds, schedule_steps=10 * epochs * ds.num_train // batch_size)
    steps = epochs * trainer.steps_per_epoch
    rows = trainer.init_rows()
    candidates = {w: chunk_rows(jax.tree.map(lambda a: a[:w], rows), w)[0] for w in probe_candidates(trials)}
    probe = trainer.probe_width(candidates, steps=max(4, trainer.steps_per_epoch // 4))
    chunks = chunk_rows(rows, probe.chosen)

    plain = PlainTrainer(MODELS[model_name], ds, batch_size)
    plain_states = [plain.init(c["seed"], c.trial_id, c["learning_rate"]) for c in configs]
    jax.block_until_ready(plain.epoch(plain_states[0], np.random.default_rng(0)))  # compile
    singles = chunk_rows(rows, 1)
    singles[0] = jax.block_until_ready(trainer.train(singles[0], 1))[0]  # compile the single-trial program
    chunks = jax.block_until_ready([trainer.train(c, 1)[0] for c in chunks])  # the chosen width is compiled

    def run_loop_epochs():
        out = []
        for i, state in enumerate(plain_states):
            rng = np.random.default_rng(i)
            for _ in range(epochs):
                state, _ = plain.epoch(state, rng)
            out.append(state)
        return out

    def run_loop_steps():
        for _ in range(steps):
            for i in range(trials):
                singles[i], _ = trainer.train(singles[i], 1)
        return singles

    def run_cohort():  # a training call donates its chunk: keep the results for the next round
        chunks[:] = [trainer.train(c, steps)[0] for c in chunks]
        return chunks

    # The same cohort on every device (on a CPU: one XLA host device per core, as `sm2jax run` uses).
    placement = Placement.create()
    n = placement.size
    if n > 1:
        spread = CohortTrainer(cohort, ds, schedule_steps=10 * epochs * ds.num_train // batch_size, placement=placement)
        widths = [n * c for c in probe_candidates(max(trials // n, 1))]
        probe_all = spread.probe_width(
            {w: chunk_rows(jax.tree.map(lambda a: a[:w], rows), w, placement)[0] for w in widths},
            steps=max(4, trainer.steps_per_epoch // 4),
        )
        spread_chunks = jax.block_until_ready(
            [spread.train(c, 1)[0] for c in chunk_rows(rows, probe_all.chosen, placement)]
        )

        def run_spread():
            spread_chunks[:] = [spread.train(c, steps)[0] for c in spread_chunks]
            return spread_chunks

    runs = {"loop-epochs": run_loop_epochs, "loop-steps": run_loop_steps, "cohort": run_cohort}
    if n > 1:
        runs["cohort-all-devices"] = run_spread
    best = {name: np.inf for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            best[name] = min(best[name], _time(fn))
    samples = trials * steps * batch_size
    return {
        "model": model_name,
        "trials": trials,
        "batch_size": batch_size,
        "epochs": epochs,
        "steps": steps,
        "width": probe.chosen,
        "probe": probe.to_json(),
        **{f"{k}_samples_per_s": samples / v for k, v in best.items()},
        "speedup_vs_loop_epochs": best["loop-epochs"] / best["cohort"],
        "speedup_vs_loop_steps": best["loop-steps"] / best["cohort"],
        "backend": jax.default_backend(),
        "devices": n,
        **(
            {
                "width_all_devices": probe_all.chosen,
                "speedup_all_devices_vs_loop_epochs": best["loop-epochs"] / best["cohort-all-devices"],
            }
            if n > 1
            else {}
        ),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model (digits, 64 inputs) | trials | batch | chosen width (1 device) | cohort vs loop of jitted epochs | cohort vs loop of jitted steps | devices | chosen width (all devices) | all devices vs loop of jitted epochs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = (
            f"{r['devices']} | {r['width_all_devices']} | {r['speedup_all_devices_vs_loop_epochs']:.2f}x"
            if r["devices"] > 1
            else "1 | - | -"
        )
        lines.append(
            f"| {r['model']} | {r['trials']} | {r['batch_size']} | {r['width']} | {r['speedup_vs_loop_epochs']:.2f}x | {r['speedup_vs_loop_steps']:.2f}x | {spread} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cpu-devices", type=int, help="XLA host devices on a CPU (default: one per core, as `sm2jax run`)"
    )
    parser.add_argument("--json", type=pathlib.Path, help="write the rows here")
    parser.add_argument("--markdown", type=pathlib.Path, help="write the table here")
    args = parser.parse_args(argv)
    request_cpu_devices(args.cpu_devices)  # before JAX starts; the loops and the 1-device cohort use device 0
    rows = []
    for name in args.models:
        row = bench(name, args.trials, args.batch_size, args.epochs, args.repeats)
        rows.append(row)
        print(
            f"{row['model']:<12} width {row['width']:>3}  vs loop-epochs {row['speedup_vs_loop_epochs']:.2f}x  vs loop-steps {row['speedup_vs_loop_steps']:.2f}x",
            flush=True,
        )
    write_table(args.markdown, markdown(rows))
    write_rows(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
