"""GPU check: real NVML energy and cohort throughput on a lent GPU, in one run (under 5 minutes).

It prints and writes (``--json``):

* the hardware profile (names, memory, power limits -- read only) and which NVML devices are
  metered: only those JAX uses, matched by PCI bus id (or the UUID/index CUDA_VISIBLE_DEVICES names);
* the idle baseline from both NVML methods over the same window;
* for each >= 1 s training window of a 16-trial ResNet-18 cohort on CIFAR-shaped random data: joules
  from ``nvmlDeviceGetTotalEnergyConsumption`` and from integrated ``nvmlDeviceGetPowerUsage`` polling
  over the *same* window, their agreement in percent, and the per-trial shares;
* the compile window on its own line;
* per workload (the digits MLP and the ResNet-18 cohort): the vmap-vs-loop speedup (one W-wide
  program vs a loop over W one-wide programs for the same trial-steps) and the achieved FLOP/s;
* the whole span against its windows (the host work between them on its own line);
* the quick digits study planned (``sm2jax plan``'s probe), then run: plan against actual.

Run::

    python experiments/gpu_check.py --json gpu_check.json

Without a GPU every energy figure prints as "unavailable" with the reason; nothing raises.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import Any

import jax
import numpy as np

from sm2jax.cohort import group_into_cohorts
from sm2jax.data import ArrayDataset, load_digits
from sm2jax.energy import EnergyMonitor, attribute, hardware_profile, make_meter
from sm2jax.energy.gpus import jax_gpus
from sm2jax.execute.rows import row_view
from sm2jax.execute.trainer import CohortTrainer
from sm2jax.space import Categorical, LogUniform, SearchSpace


def _fmt(joules: float | None) -> str:
    return "unavailable" if joules is None else f"{joules:9.2f} J"


def synthetic_images(n: int = 4096, seed: int = 0) -> ArrayDataset:
    """CIFAR-shaped random images with a learnable label (brightness decile): no download needed."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 32, 32, 3), dtype=np.float32)
    y = np.minimum((x.mean(axis=(1, 2, 3)) - 0.49) * 500 + 5, 9).clip(0).astype(np.int32)
    cut = n * 7 // 8
    return ArrayDataset("synthetic-cifar", "classification", x[:cut], y[:cut], x[cut:], y[cut:], 10)


RESNET = {"name": "resnet18", "width": 16}


def throughput(model: dict, ds: ArrayDataset, *, trials: int, batch_size: int, seconds: float = 2.0) -> dict[str, Any]:
    """Samples/s and FLOP/s of one ``trials``-wide program against a loop over one-wide programs
    (the per-trial jitted loop a user would write), for the same trial-steps."""
    space = SearchSpace({"model": model, "learning_rate": LogUniform(1e-3, 0.1, num=trials), "batch_size": batch_size})
    (cohort,) = group_into_cohorts(space.grid())
    trainer = CohortTrainer(cohort, ds, schedule_steps=10_000)
    wide = trainer.init(trials)
    ones = trainer.init(1)
    wide = jax.block_until_ready([trainer.train(c, 2)[0] for c in wide])  # compile both, warm up
    ones = jax.block_until_ready([trainer.train(c, 2)[0] for c in ones])

    def timed(chunks, steps):  # a training call donates its chunk: the list keeps the results
        t0 = time.perf_counter()
        chunks[:] = jax.block_until_ready([trainer.train(c, steps)[0] for c in chunks])
        return time.perf_counter() - t0

    probe = timed(wide, 2) / 2
    steps = max(2, int(seconds / max(probe, 1e-6)))
    t_wide, t_loop = timed(wide, steps), timed(ones, steps)
    flops = trainer.flops_per_trial_step(wide[0])
    samples = trials * steps * batch_size
    return {
        "model": model,
        "trials": trials,
        "batch_size": batch_size,
        "steps": steps,
        "vmap_seconds": t_wide,
        "loop_seconds": t_loop,
        "vmap_over_loop_speedup": t_loop / t_wide,
        "vmap_samples_per_s": samples / t_wide,
        "loop_samples_per_s": samples / t_loop,
        "flops_per_trial_step": flops,
        "vmap_flops_per_s": None if flops is None else flops * trials * steps / t_wide,
        "loop_flops_per_s": None if flops is None else flops * trials * steps / t_loop,
    }


def run(
    windows: int = 4,
    window_seconds: float = 3.0,
    idle_seconds: float = 3.0,
    trials: int = 16,
    width: int = 8,
    model: dict | None = None,
    nvml: Any = None,
    gpus: Any = None,
    workloads: bool = True,
    digits_model: dict | None = None,
    plan: bool = False,
) -> dict[str, Any]:
    gpus = gpus if gpus is not None else jax_gpus()
    counter = make_meter("nvml-counter", nvml=nvml, gpus=gpus)
    power = make_meter("nvml-power", nvml=nvml, interval_s=0.05, gpus=gpus)
    meters = {"nvml-counter": EnergyMonitor(counter), "nvml-power": EnergyMonitor(power)}
    out: dict[str, Any] = {
        "profile": hardware_profile(nvml),
        "methods": {
            k: {"method": m.meter.method, "note": m.meter.reason, "devices": m.meter.devices} for k, m in meters.items()
        },
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_gpus": gpus,
    }
    print("devices:", out["jax_devices"])
    for gpu in out["profile"]["gpus"]:
        print(
            f"gpu{gpu['index']}: {gpu['name']}, power limit {gpu.get('power_limit_w')} W, range {gpu.get('power_limit_range_w')}"
        )
    for name, m in meters.items():
        print(f"{name:<13} -> {m.meter.describe()}")
        for d in m.meter.devices or []:  # which card each JAX device is, how it was found, how it is read
            print(
                f"  {d.get('jax', '?')} -> {d['nvml']}: {d.get('method')} (found by {d.get('by')}; power limit {d.get('power_limit_w')} W)"
            )
    try:
        out["idle"] = {}
        windows_idle = {k: m.begin("idle") for k, m in meters.items()}
        time.sleep(idle_seconds)
        for k, m in meters.items():
            r = m.end(windows_idle[k])
            watts = None if r.joules is None else r.joules / r.seconds
            out["idle"][k] = watts
            print(f"idle baseline [{k}]: {'unavailable' if watts is None else f'{watts:.1f} W'}")

        ds = synthetic_images()
        space = SearchSpace(
            {
                "model": model or RESNET,
                "optimizer": "sgd",
                "learning_rate": LogUniform(1e-3, 0.3, num=trials),
                "batch_size": Categorical([128]),
            }
        )
        (cohort,) = group_into_cohorts(space.grid())
        trainer = CohortTrainer(cohort, ds, schedule_steps=1000)
        state = trainer.init(width)  # ceil(trials / width) chunks of one width-wide program
        begins = {k: m.begin("compile", after=state) for k, m in meters.items()}
        t0 = time.perf_counter()
        trainer.compile_train(state[0])
        compile_s = time.perf_counter() - t0
        out["compile"] = {k: m.end(begins[k]).joules for k, m in meters.items()}
        out["compile"]["seconds"] = compile_s
        print(
            f"compile: {compile_s:.1f} s, counter {_fmt(out['compile']['nvml-counter'])}, power {_fmt(out['compile']['nvml-power'])}"
        )

        # Size windows from one timed call so each lasts about window_seconds.
        t0 = time.perf_counter()
        state = jax.block_until_ready([trainer.train(c, 5)[0] for c in state])
        per_step = (time.perf_counter() - t0) / 5
        steps = max(5, int(window_seconds / per_step))
        flops = trainer.flops_per_trial_step(state[0])
        out["windows"] = []
        print(f"{'window':>6} {'seconds':>8} {'counter':>12} {'power-polled':>13} {'ratio':>6}  samples/s")
        first = {k: m.sample() for k, m in meters.items()}  # the whole span's first reading
        for i in range(windows):
            before = row_view(state, "step", trials)
            begins = {k: m.begin(f"train-{i}", after=state) for k, m in meters.items()}
            state = [trainer.train(c, steps)[0] for c in state]
            readings = {k: m.end(begins[k], state) for k, m in meters.items()}
            work = ((row_view(state, "step", trials) - before) * (flops or 1.0)).tolist()
            shares, _ = attribute(readings["nvml-counter"].joules, work)
            c, p = readings["nvml-counter"].joules, readings["nvml-power"].joules
            ratio = None if c is None or p is None or c == 0 else p / c
            secs = readings["nvml-counter"].seconds
            rate = trials * steps * cohort.signature.batch_size / secs
            agreement = None if ratio is None else 100 * (ratio - 1)
            out["windows"].append(
                {
                    "seconds": secs,
                    "steps": steps,
                    "counter_j": c,
                    "power_j": p,
                    "ratio_power_over_counter": ratio,
                    "agreement_percent": agreement,
                    "samples_per_s": rate,
                    "shares_j": shares,
                    "notes": {k: r.note for k, r in readings.items()},
                }
            )
            print(
                f"{i:>6} {secs:8.2f} {_fmt(c):>12} {_fmt(p):>13} {'n/a' if ratio is None else f'{ratio:6.3f}'}  {rate:,.0f}"
            )
        # Whole span vs windows: what a study would miss if it summed its windows alone.
        for k, m in meters.items():
            span = m.between("span", first[k], m.sample()).joules
            inside = [w["counter_j" if k == "nvml-counter" else "power_j"] for w in out["windows"]]
            windowed = None if None in inside else sum(inside)
            between = None if span is None or windowed is None else span - windowed
            out.setdefault("whole_span", {})[k] = {"span_j": span, "windows_j": windowed, "between_j": between}
            print(f"whole span [{k}]: {_fmt(span)} = windows {_fmt(windowed)} + between windows {_fmt(between)}")
        last = out["windows"][-1]["shares_j"]
        print(
            "per-trial shares of the last window (counter):",
            "unavailable" if last[0] is None else [round(s, 2) for s in last],
        )
        out["flops_per_trial_step"] = flops
        if workloads:
            digits = load_digits()
            out["workloads"] = {
                "digits-mlp": throughput(
                    digits_model or {"name": "mlp", "hidden": [64]}, digits, trials=trials, batch_size=64
                ),
                "resnet18-cifar": throughput(model or RESNET, ds, trials=min(trials, width), batch_size=128),
            }
            for name, w in out["workloads"].items():
                fl = "n/a" if w["vmap_flops_per_s"] is None else f"{w['vmap_flops_per_s'] / 1e12:.2f} TFLOP/s"
                print(
                    f"{name}: vmap {w['vmap_samples_per_s']:,.0f} samples/s vs loop {w['loop_samples_per_s']:,.0f} ({w['vmap_over_loop_speedup']:.2f}x), {fl}"
                )
    finally:
        for m in meters.values():
            m.meter.close()
    if plan:
        out["plan"] = plan_against_actual(nvml=nvml, gpus=gpus)
    return out


def plan_against_actual(nvml: Any = None, gpus: Any = None, quick: bool = True) -> list[dict[str, Any]] | None:
    """The digits study planned (:func:`sm2jax.probe.probe`), then run on the same meter: each
    plan line beside what the study measured (and whether it fell inside the stated range)."""
    import tempfile

    from sm2jax.plan import format_plan, format_plan_vs_actual
    from sm2jax.presets import digits as digits_preset
    from sm2jax.store.folder import StudyDir
    from sm2jax.study import Study, plan_study

    spec = digits_preset(quick=quick)
    plan = plan_study(spec, nvml=nvml, gpus=gpus, same_process=True)
    print(format_plan(plan))
    with tempfile.TemporaryDirectory(prefix="sm2jax-gpu-check-") as tmp:
        StudyDir(tmp).write_plan(plan.to_json())
        results = Study(tmp, spec, nvml=nvml, gpus=gpus, progress=False).run()
    rows = results.get("plan")
    print("\n".join(format_plan_vs_actual(rows)) if rows else "plan against actual: unavailable")
    return rows


def main(argv=None, nvml: Any = None, gpus: Any = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window-seconds", type=float, default=3.0)
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--model", type=json.loads, default=RESNET, help="model spec as JSON")
    parser.add_argument(
        "--digits-model", type=json.loads, default={"name": "mlp", "hidden": [64]}, help="model spec as JSON"
    )
    parser.add_argument("--no-workloads", action="store_true", help="skip the vmap-vs-loop throughput part")
    parser.add_argument("--no-plan", action="store_true", help="skip planning and running the quick digits study")
    args = parser.parse_args(argv)
    out = run(
        args.windows,
        args.window_seconds,
        args.idle_seconds,
        args.trials,
        args.width,
        args.model,
        nvml=nvml,
        gpus=gpus,
        workloads=not args.no_workloads,
        digits_model=args.digits_model,
        plan=not args.no_plan,
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
