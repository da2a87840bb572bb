"""GPU check: real NVML energy for a training cohort, counter vs power polling, side by side.

One short script for a lent GPU (about 2 minutes). It prints and writes (``--json``):

* the hardware profile (names, memory, power limits -- read only);
* the idle baseline from both NVML methods;
* for each training window of a 16-trial cohort: joules from ``nvmlDeviceGetTotalEnergyConsumption``
  and from integrated ``nvmlDeviceGetPowerUsage`` polling over the *same* window, their ratio, and
  the per-trial shares;
* the compile window on its own line.

Run::

    python experiments/gpu_check.py --json gpu_check.json

Without a GPU every figure prints as "unavailable" with the reason; nothing raises.
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
from sm2jax.data import ArrayDataset
from sm2jax.energy import EnergyMonitor, attribute, hardware_profile, make_meter, measure_idle
from sm2jax.space import Categorical, LogUniform, SearchSpace
from sm2jax.trainer import CohortTrainer, row_view


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


def run(windows: int = 4, window_seconds: float = 3.0, idle_seconds: float = 3.0, trials: int = 16, width: int = 8, model: dict | None = None, nvml: Any = None) -> dict[str, Any]:
    counter = make_meter("nvml-counter", nvml=nvml)
    power = make_meter("nvml-power", nvml=nvml, interval_s=0.05)
    meters = {"nvml-counter": EnergyMonitor(counter), "nvml-power": EnergyMonitor(power)}
    out: dict[str, Any] = {
        "profile": hardware_profile(nvml),
        "methods": {k: {"method": m.meter.method, "note": m.meter.reason} for k, m in meters.items()},
        "jax_devices": [str(d) for d in jax.devices()],
    }
    print("devices:", out["jax_devices"])
    for gpu in out["profile"]["gpus"]:
        print(f"gpu{gpu['index']}: {gpu['name']}, power limit {gpu.get('power_limit_w')} W, range {gpu.get('power_limit_range_w')}")
    for name, m in meters.items():
        print(f"{name:<13} -> {m.meter.describe()}")
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
        space = SearchSpace({"model": model or RESNET, "optimizer": "sgd", "learning_rate": LogUniform(1e-3, 0.3, num=trials), "batch_size": Categorical([128])})
        (cohort,) = group_into_cohorts(space.grid())
        trainer = CohortTrainer(cohort, ds, schedule_steps=1000)
        state = trainer.init(width)  # ceil(trials / width) chunks of one width-wide program
        begins = {k: m.begin("compile", after=state) for k, m in meters.items()}
        t0 = time.perf_counter()
        trainer.compile_train(state[0])
        compile_s = time.perf_counter() - t0
        out["compile"] = {k: m.end(begins[k]).joules for k, m in meters.items()}
        out["compile"]["seconds"] = compile_s
        print(f"compile: {compile_s:.1f} s, counter {_fmt(out['compile']['nvml-counter'])}, power {_fmt(out['compile']['nvml-power'])}")

        # Size windows from one timed call so each lasts about window_seconds.
        t0 = time.perf_counter()
        state = jax.block_until_ready([trainer.train(c, 5)[0] for c in state])
        per_step = (time.perf_counter() - t0) / 5
        steps = max(5, int(window_seconds / per_step))
        flops = trainer.flops_per_trial_step(state[0])
        out["windows"] = []
        print(f"{'window':>6} {'seconds':>8} {'counter':>12} {'power-polled':>13} {'ratio':>6}  samples/s")
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
            out["windows"].append({"seconds": secs, "steps": steps, "counter_j": c, "power_j": p, "ratio_power_over_counter": ratio, "samples_per_s": rate, "shares_j": shares, "notes": {k: r.note for k, r in readings.items()}})
            print(f"{i:>6} {secs:8.2f} {_fmt(c):>12} {_fmt(p):>13} {'n/a' if ratio is None else f'{ratio:6.3f}'}  {rate:,.0f}")
        last = out["windows"][-1]["shares_j"]
        print("per-trial shares of the last window (counter):", "unavailable" if last[0] is None else [round(s, 2) for s in last])
        out["flops_per_trial_step"] = flops
    finally:
        for m in meters.values():
            m.meter.close()
    return out


def main(argv=None, nvml: Any = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window-seconds", type=float, default=3.0)
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--model", type=json.loads, default=RESNET, help="model spec as JSON")
    args = parser.parse_args(argv)
    out = run(args.windows, args.window_seconds, args.idle_seconds, args.trials, args.width, args.model, nvml=nvml)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
