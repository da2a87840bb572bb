"""Benchmark: one study on 1, 2, 4, 8 devices (the ``trials`` mesh axis).

The same full-search study (every configuration to the full budget, one cohort, the widest width,
probe off) runs with ``Study(..., devices=n)`` for each device count, and once more on one device
from width 1 (the CPU default, the strongest single-device contender there), in one process, interleaved
over ``--repeats`` rounds (best of each). From each study's ledger: training samples per second of
the training windows, joules per training sample (the meter's method is stated: ``estimated`` on a
CPU, NVML on GPUs, summed over the devices used), compile seconds and wall seconds.

On a CPU host the devices are XLA host-platform devices (``--cpu-devices``, default 8, set before JAX
starts); they share the host's cores, so more of them cannot train faster than the cores allow: the
figures check that sharding costs nothing and that energy is attributed, not a speed-up. On a
multi-GPU host the devices are the GPUs, and the ratios are the scaling.

Run::

    python experiments/bench/scaling.py --json results/scaling.json --markdown results/scaling.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import tempfile


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--cpu-devices", type=int, default=8, help="XLA host-platform devices when JAX runs on the CPU")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--markdown", type=pathlib.Path)
    args = parser.parse_args(argv)
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.cpu_devices}"
        ).strip()

    import jax

    sys.path.insert(0, os.path.dirname(__file__))
    from _results import write_rows, write_table

    from sm2jax.energy import read_ledger
    from sm2jax.space import LogUniform, SearchSpace
    from sm2jax.spec import StudySpec
    from sm2jax.study import Study

    available = len(jax.devices())
    counts = [n for n in args.devices if n <= available]
    if not counts:
        parser.error(f"none of --devices {args.devices} is available ({available} {jax.default_backend()} devices)")
    space = SearchSpace(
        {
            "model": {"name": "mlp", "hidden": list(args.hidden)},
            "learning_rate": LogUniform(1e-4, 1e-1, num=args.trials),
            "batch_size": args.batch_size,
        }
    )
    spec = StudySpec(
        space=space.to_json(),
        mode="full",
        max_budget=args.epochs,
        min_budget=args.epochs,
        idle_seconds=0,
        probe_width=False,
        width_start="widest",
    )
    # Contenders: n devices at the widest width, and one device at width 1 (the CPU default).
    contenders = [(n, "widest") for n in counts] + [(1, "narrowest")]
    best: dict[tuple, dict] = {}
    compile_s: dict[tuple, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for n, start in contenders:
                folder = os.path.join(tmp, f"r{r}-d{n}-{start}")
                results = Study(folder, dataclasses.replace(spec, width_start=start), devices=n, progress=False).run()
                records = read_ledger(os.path.join(folder, "ledger.jsonl"))
                train = [w for w in records if w["type"] == "window" and w["kind"] == "train"]
                samples = sum(t["samples"] for t in records if t["type"] == "trial" and t["kind"] == "train")
                seconds = sum(w["seconds"] for w in train)
                joules = None if any(w["joules"] is None for w in train) else sum(w["joules"] for w in train)
                compile_s.setdefault(
                    (n, start), results["energy_by_phase"].get("compile", {}).get("seconds") or 0.0
                )  # first round: programs new to the process
                row = {
                    "devices": n,
                    "width_start": start,
                    "platform": jax.default_backend(),
                    "trials": args.trials,
                    "model": f"mlp-{'x'.join(map(str, args.hidden))}",
                    "batch_size": args.batch_size,
                    "width": next(iter(results["hardware"].values()))["width"],
                    "samples": samples,
                    "train_seconds": seconds,
                    "samples_per_s": samples / seconds,
                    "joules_per_sample": None if joules is None else joules / samples,
                    "energy_method": results["energy_method"],
                    "compile_seconds": compile_s[(n, start)],
                    "wall_seconds": results["wall_seconds_this_attempt"],
                    "test_accuracy": results["selected"]["test"]["metric"] if results["selected"].get("test") else None,
                }
                if (n, start) not in best or row["train_seconds"] < best[(n, start)]["train_seconds"]:
                    best[(n, start)] = row
    rows = [best[c] for c in contenders]
    base = rows[0]
    for row in rows:
        row["speedup_vs_first"] = row["samples_per_s"] / base["samples_per_s"]
        row["energy_per_sample_vs_first"] = (
            None
            if row["joules_per_sample"] is None or base["joules_per_sample"] is None
            else row["joules_per_sample"] / base["joules_per_sample"]
        )
    write_rows(args.json, rows)
    lines = [
        "| devices | platform | width | train samples/s | J/sample | speed-up | energy/sample ratio | compile s (first round) | wall s (best round) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        jps = (
            "unavailable"
            if row["joules_per_sample"] is None
            else f"{row['joules_per_sample']:.2e} [{row['energy_method']}]"
        )
        ratio = "n/a" if row["energy_per_sample_vs_first"] is None else f"{row['energy_per_sample_vs_first']:.2f}x"
        lines.append(
            f"| {row['devices']}{' (width-1 start)' if row['width_start'] == 'narrowest' else ''} | {row['platform']} | {row['width']} | {row['samples_per_s']:,.0f} | {jps} | {row['speedup_vs_first']:.2f}x | {ratio} | {row['compile_seconds'] or 0:.1f} | {row['wall_seconds']:.1f} |"
        )
    write_table(args.markdown, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
