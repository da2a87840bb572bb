"""Benchmark: how long each program of a study takes to compile, against the plain single-trial program.

For each model and batch size, each program is traced, lowered and compiled in a fresh process (cold:
no persistent cache, nothing compiled before it but the data transfer), repeats interleaved because
this machine is shared and noisy:

* ``plain``: the single-trial epoch program a user would write (``_plain.PlainTrainer``: one
  ``lax.scan`` epoch of Adam steps, learning rate traced);
* ``train``: sm2jax's training program at one row per device, optimised (XLA's defaults);
* ``train-quick``: the same program built quick (:data:`sm2jax.execute.trainer.QUICK_COMPILE`), what a
  cohort whose planned training is short compiles on a CPU backend;
* ``plain-init``: the plain loop's initialisation (``build_model`` from a key, then
  ``inject_hyperparams(adam).init``);
* ``init`` and ``eval``: sm2jax's initialisation (one trial, keys derived inside from seed and trial
  id, built with :data:`sm2jax.execute.trainer.INIT_COMPILE` on a CPU backend, as a study builds it) and
  evaluation programs.

Reported per program: trace + lower seconds, backend compile seconds and their sum (median), and the
sum's ratio to ``plain`` (``init``'s to ``plain-init``). Also measured: a training step of each sm2jax build (one row per device,
best of 3 epochs), the price the quick build pays.

Run (about 5 minutes on a 2-core CPU with 3 repeats)::

    python experiments/bench/compile_time.py --repeats 3 --json results/compile_time.json --markdown results/compile_time.md
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
PROGRAMS = ("plain", "train", "train-quick", "plain-init", "init", "eval")
CASES = {
    "digits-mlp64-bs16": ("digits", {}, {"name": "mlp", "hidden": [64]}, 16),
    "digits-mlp64-bs256": ("digits", {}, {"name": "mlp", "hidden": [64]}, 256),
    "mnist1d-mlp256x256-bs32": ("mnist1d", {"num_samples": 5000}, {"name": "mlp", "hidden": [256, 256]}, 32),
    "mnist1d-mlp256x256-bs128": ("mnist1d", {"num_samples": 5000}, {"name": "mlp", "hidden": [256, 256]}, 128),
}


def _lower_and_compile(lower, options=None):
    """``(compiled, trace + lower seconds, backend compile seconds)`` of ``lower()``'s program."""
    t0 = time.perf_counter()
    lowered = lower()
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options=options)
    return compiled, t1 - t0, time.perf_counter() - t1


def child(program: str, case: str) -> dict:
    """Traces, lowers and compiles one program in this (fresh) process; returns its timings."""
    from sm2jax.execute.placement import request_cpu_devices

    if not program.startswith("plain"):
        request_cpu_devices()  # as `sm2jax run` does: one host device per core
    import jax
    import numpy as np

    from sm2jax.data import load_dataset

    data, options, model, batch_size = CASES[case]
    ds = load_dataset(data, **options)
    out: dict = {}
    if program == "plain-init":
        from _plain import _init_program

        init = _init_program(json.dumps(model, sort_keys=True), ds.input_shape, ds.num_outputs)
        _, lower_s, compile_s = _lower_and_compile(lambda: init.lower(jax.random.PRNGKey(0), np.float32(1e-3)))
        run = None
    elif program == "plain":
        from _plain import PlainTrainer

        tr = PlainTrainer(model, ds, batch_size)
        state = tr.init(0, 0, 1e-3)
        perm = np.zeros((tr.steps_per_epoch, batch_size), np.int32)
        _, lower_s, compile_s = _lower_and_compile(lambda: tr._epoch.lower(*state, tr.x, tr.y, perm))
        run = None
    else:
        from sm2jax.cohort import group_into_cohorts
        from sm2jax.execute.placement import Placement
        from sm2jax.execute.rows import chunk_rows
        from sm2jax.execute.trainer import CohortTrainer
        from sm2jax.space import Categorical, SearchSpace

        space = SearchSpace({"model": model, "learning_rate": Categorical([1e-3]), "batch_size": batch_size})
        (cohort,) = group_into_cohorts(space.grid())
        placement = Placement.create()
        trainer = CohortTrainer(cohort, ds, schedule_steps=1000, placement=placement)
        hps = {k: np.float32(0) for k in trainer.hyperparameter_names}
        if program == "init":
            prog = trainer.program("init", 0)
            _, lower_s, compile_s = _lower_and_compile(
                lambda: prog.lower(np.int32(0), np.int32(0), hps), dict(prog.options) or None
            )
            run = None
        else:
            width = placement.size  # one row per device, as a CPU cohort starts
            rows = trainer.init_rows()
            chunk = chunk_rows(jax.tree.map(lambda a: np.repeat(a, width, 0), rows), width, placement)[0]
            if program == "eval":
                prog = trainer.program("eval", width)
                _, lower_s, compile_s = _lower_and_compile(
                    lambda: prog.lower(chunk.params, chunk.model_state, *trainer.data["val"][0]),
                    dict(prog.options) or None,
                )
                run = None
            else:
                prog = trainer.program("train", width, quick=program == "train-quick")
                lower = lambda: prog.lower(chunk, np.int32(1), trainer.data["x_train"], trainer.data["y_train"])
                compiled, lower_s, compile_s = _lower_and_compile(lower, dict(prog.options) or None)
                steps = trainer.steps_per_epoch
                run = lambda: compiled(chunk, np.int32(steps), trainer.data["x_train"], trainer.data["y_train"])
    out.update(lower_s=lower_s, compile_s=compile_s)
    if run is not None:
        jax.block_until_ready(run())
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            jax.block_until_ready(run())
            best = min(best, time.perf_counter() - t)
        out["step_s"] = best / steps
    return out


def _one(program: str, case: str) -> dict:
    from _results import run_child

    return {"program": program, "case": case, **run_child(__file__, [program, "--case", case], cache="off")[0]}


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for case in dict.fromkeys(r["case"] for r in runs):
        for program in PROGRAMS:
            mine = [r for r in runs if r["case"] == case and r["program"] == program]
            if not mine:
                continue
            row = {"case": case, "program": program, "runs": len(mine)}
            for key in ("lower_s", "compile_s"):
                row[key] = statistics.median(r[key] for r in mine)
            row["total_s"] = statistics.median(r["lower_s"] + r["compile_s"] for r in mine)
            if all("step_s" in r for r in mine):
                row["step_s"] = min(r["step_s"] for r in mine)
            rows.append(row)
    for row in rows:
        plain = next(
            (
                r
                for r in rows
                if r["case"] == row["case"]
                and r["program"] == ("plain-init" if row["program"] in ("init", "plain-init") else "plain")
            ),
            None,
        )
        if plain is not None:
            row["vs_plain"] = row["total_s"] / plain["total_s"]
        optimised = next((r for r in rows if r["case"] == row["case"] and r["program"] == "train"), None)
        if "step_s" in row and optimised is not None:
            row["step_vs_optimised"] = row["step_s"] / optimised["step_s"]
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| case | program | trace + lower s | compile s | total s | total vs plain | step (us) | step vs optimised |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step = f"{r['step_s'] * 1e6:.0f}" if "step_s" in r else ""
        step_ratio = f"{r['step_vs_optimised']:.2f}x" if "step_vs_optimised" in r else ""
        lines.append(
            f"| {r['case']} | {r['program']} | {r['lower_s']:.2f} | {r['compile_s']:.2f} | {r['total_s']:.2f} | {r.get('vs_plain', float('nan')):.2f}x | {step} | {step_ratio} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=PROGRAMS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--markdown", type=pathlib.Path)
    parser.add_argument("--child", choices=PROGRAMS, help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.case)))
        return None
    sys.path.insert(0, str(HERE))
    from _results import rotated, write_rows, write_table

    runs = []
    for rep in range(args.repeats):
        for case in args.cases:
            for program in rotated(args.programs, rep):
                run = _one(program, case)
                runs.append(run)
                print(
                    f"{case:<26} {program:<12} lower {run['lower_s']:5.2f} s  compile {run['compile_s']:5.2f} s",
                    flush=True,
                )
    rows = summarize(runs)
    write_table(args.markdown, markdown(rows))
    write_rows(args.json, [{"summary": rows, "runs": runs}])
    return rows


if __name__ == "__main__":
    main()
