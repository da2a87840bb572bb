"""Run by test_scale_out.py in a subprocess with 4 CPU devices (XLA's host platform device count is
fixed when JAX starts, so it cannot be changed inside the test process). Prints one JSON object."""

from __future__ import annotations

import json
import os
import sys

assert "--xla_force_host_platform_device_count=4" in os.environ.get("XLA_FLAGS", "")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from fake_nvml import make_card, make_fake_nvml  # noqa: E402

from sm2jax.cohort import group_into_cohorts  # noqa: E402
from sm2jax.data import load_digits  # noqa: E402
from sm2jax.energy import read_ledger  # noqa: E402
from sm2jax.execute.placement import Placement, collectives_in  # noqa: E402
from sm2jax.execute.rows import chunk_rows  # noqa: E402
from sm2jax.execute.trainer import CohortTrainer  # noqa: E402
from sm2jax.space import Categorical, LogUniform, SearchSpace  # noqa: E402
from sm2jax.spec import StudySpec  # noqa: E402
from sm2jax.study import Study  # noqa: E402


def main(out_dir: str) -> dict:
    space = SearchSpace(
        {
            "model": {"name": "mlp", "hidden": [32]},
            "learning_rate": LogUniform(1e-3, 1e-1, num=6),
            "batch_size": Categorical([32, 64]),
        }
    )
    spec = StudySpec(
        space=space.to_json(),
        mode="sh",
        min_budget=1,
        max_budget=3,
        eta=3,
        idle_seconds=0,
        probe_width=False,
        width_start="widest",
        max_train_examples=600,
        max_val_examples=200,
        energy_method="estimated",
    )
    report: dict = {"devices": len(jax.devices())}
    studies = {n: Study(os.path.join(out_dir, f"d{n}"), spec, devices=n, progress=False).run() for n in (1, 4)}
    for n, r in studies.items():
        report[f"d{n}"] = {
            "selected": r["selected"]["trial_id"],
            "scores": {t["trial_id"]: t["score"] for t in r["trials"]},
            "decisions": [(d["phase"], d["trial_id"], d["kept"]) for d in r["decisions"]],
            "widths": {name: h["width"] for name, h in r["hardware"].items()},
            "ledger_trials": sorted(
                {
                    rec["trial_id"]
                    for rec in read_ledger(os.path.join(out_dir, f"d{n}", "ledger.jsonl"))
                    if rec["type"] == "trial"
                }
            ),
        }

    # The compiled programs of a 4-device cohort: per-device, with donated state.
    placement = Placement.create(4)
    (cohort,) = group_into_cohorts(
        SearchSpace({"model": {"name": "mlp", "hidden": [32]}, "learning_rate": LogUniform(1e-3, 1e-1, num=8)}).grid()
    )
    trainer = CohortTrainer(cohort, load_digits(), schedule_steps=100, placement=placement)
    (chunk,) = chunk_rows(trainer.init_rows(), 8, placement)
    train, evaluate = trainer.compile_train(chunk), trainer.compile_eval(chunk)
    state_bytes = sum(a.nbytes for a in jax.tree.leaves(chunk))
    # Costs per trial from XLA's (per-device) cost analysis, on 4 devices and on 1.
    single = CohortTrainer(cohort, load_digits(), schedule_steps=100, placement=Placement.create(1))
    (one_chunk,) = chunk_rows(single.init_rows(), 8, single.placement)
    flops = {
        n: (t.flops_per_trial_step(c), t.forward_flops_per_example(c))
        for n, t, c in ((4, trainer, chunk), (1, single, one_chunk))
    }
    memory = train.memory_analysis()
    psum = (
        jax.jit(
            jax.shard_map(
                lambda x: jax.lax.psum(x, "trials"), mesh=placement.mesh, in_specs=jax.P("trials"), out_specs=jax.P()
            )
        )
        .lower(np.ones(4, np.float32))
        .compile()
    )
    # One real trial on 4 devices: the 3 padding devices skip the call (a branch, not a select).
    (lone,) = chunk_rows(jax.tree.map(lambda a: a[:1], trainer.init_rows()), 4, placement)
    before = jax.device_get(lone)
    lone, _ = trainer.train(lone, 5)
    after = jax.device_get(lone)
    (together,) = chunk_rows(trainer.init_rows(), 8, placement)
    together = jax.device_get(trainer.train(together, 5)[0])
    report["padding"] = {
        "steps": after.step.tolist(),
        "trial_ids": after.trial_id.tolist(),
        "padding_params_unchanged": all(
            bool(np.array_equal(a[1:], b[1:]))
            for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(before.params))
        ),
        "real_row_max_diff": max(
            float(np.abs(a[0] - b[0]).max())
            for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(together.params))
        ),
    }
    report["programs"] = {
        "train_has_branch": " conditional(" in train.as_text(),
        "train_collectives": collectives_in(train),
        "eval_collectives": collectives_in(evaluate),
        "psum_collectives": collectives_in(psum),
        "state_bytes": int(state_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes),
        "flops": {str(n): f for n, f in flops.items()},
        "state_sharding": str(chunk.step.sharding.spec),
        "shard_rows": [int(s.data.shape[0]) for s in chunk.step.addressable_shards],
    }

    # Each trial is charged by its own device: 4 metered cards (NVML test double) of different power.
    cards = [make_card(i, power_mw=100_000 * (i + 1)) for i in range(4)]
    gpus = [{"index": i, "jax": str(d)} for i, d in enumerate(jax.devices())]
    nv = Study(
        os.path.join(out_dir, "nvml"),
        StudySpec(**{**spec.to_json(), "energy_method": "auto", "steps_per_window": 3}),
        nvml=make_fake_nvml(cards),
        gpus=gpus,
        devices=4,
        progress=False,
    )
    nv.run()
    windows = []
    records = read_ledger(os.path.join(out_dir, "nvml", "ledger.jsonl"))
    for w in (r for r in records if r["type"] == "window" and r["kind"] == "train"):
        trials = [r for r in records if r["type"] == "trial" and r["window_id"] == w["window_id"]]
        windows.append(
            {
                "per_device": w["per_device"],
                "unattributed": w["unattributed_joules"],
                "trials": [(t["trial_id"], t["device_keys"], t["joules"], t["steps"]) for t in trials],
            }
        )
    report["nvml_windows"] = windows
    report["nvml_keys"] = [e["nvml"] for e in nv.energy.meter.devices]
    return report


if __name__ == "__main__":
    print("REPORT " + json.dumps(main(sys.argv[1])))
