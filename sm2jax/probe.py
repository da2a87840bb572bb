"""A study probed before it runs: every cohort built as the study builds it and trained in three
short calls (:func:`probe_cohorts`), in a temporary folder, and the plan made from what that cost
(:func:`probe`; :func:`sm2jax.study.plan_study` is the way in)."""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

from sm2jax.cohort import blame, group_into_cohorts
from sm2jax.compile_cache import count_compiles
from sm2jax.energy.ledger import add_known
from sm2jax.phases import StudyState
from sm2jax.plan import DEFAULT_PLAN_NOISE, PROBE_FRACTION, StudyPlan, cohort_plans, predict, test_evals
from sm2jax.rates import CohortRate, measured_rates
from sm2jax.rounds import round_phases
from sm2jax.tasks import get_task


def probe_cohorts(study: Any, fraction: float, min_call_seconds: float = 0.25) -> dict[str, Any]:
    """Builds every cohort as :meth:`run` does (the same programs) and trains each in three
    calls -- one step, then ``s`` steps (``fraction`` of its first phase's, at least 2), then at
    least ``2 s`` and enough to last ``min_call_seconds`` (at most its full budget) -- each
    evaluated, then commits once, and builds every cohort again (what a study in this
    process pays for programs already in memory), in ``study``'s folder (a :class:`~sm2jax.study.Study`), without a decision
    (:func:`probe` runs it in a temporary folder). Returns the ledger's records
    (``again``: the second build's), the span, the energy method, the real XLA compiles, the
    commit's seconds and each cohort's width."""
    phases = round_phases(study.steps, 1)  # (a study of one round: plan_study refuses more)
    name, budget = phases[0]
    state = StudyState(metric_name=get_task(study.work.data.task).metric_name)
    win = {"window_seconds": study.spec.window_seconds, "steps_per_window": study.spec.steps_per_window}
    runners = []
    study._optuna_due = math.inf  # a probe's commit writes no optuna.db
    with count_compiles() as tally:
        study.energy.open()
        checkpoints = study.folder.checkpoints()
        try:
            for c in group_into_cohorts(list(study.configs.values())):
                with blame(c, "compile"):
                    r = study.work.create_runner(c, state, phases)
                if r is None:
                    continue
                runners.append(r)
                # One step (the warm-up), then s steps, then enough to last long enough for
                # the meter: a call's cost and a step's apart.
                bs = c.signature.batch_size
                s = max(2, round(fraction * study.work.steps(budget, bs)))
                planned = study.work.planned(r, phases, 0)
                with blame(c, f"{name} (plan probe)"):
                    r.train_to(1, "probe-1", planned_trial_steps=planned, **win)
                    r.evaluate("probe-1")
                    t0 = time.perf_counter()
                    r.train_to(1 + s, "probe-2", planned_trial_steps=planned, **win)
                    per_step = max(time.perf_counter() - t0, 1e-6) / s
                    r.evaluate("probe-2")
                    most = study.work.steps(study.spec.max_budget, bs)
                    more = min(max(2 * s, math.ceil(min_call_seconds / per_step)), max(most - 1 - s, 2 * s))
                    r.train_to(1 + s + more, "probe-3", planned_trial_steps=planned, **win)
                    r.evaluate("probe-3")
            study.metering.flush()
            t0 = time.perf_counter()  # the host work of one phase's commit, as the study does it
            study._commit(0, state, checkpoints, {r.spec.name: r.rows() for r in runners}, last=False)
            commit_seconds = time.perf_counter() - t0
            before = len(study.energy.ledger.records())
            for c in group_into_cohorts(list(study.configs.values())):  # again: the programs are in memory
                study.work.create_runner(c, StudyState(), phases)
            study.metering.flush()
            records = study.energy.ledger.records()
            again = records[before:]
            span = study.metering.close_span()
        finally:
            checkpoints.close()
            study.energy.close()
            study._optuna.join()
    return {
        "records": records[:before],
        "again": again,
        "span": span,
        "method": study.energy.method,
        "compiles": tally.backend_compiles,
        "commit_seconds": commit_seconds,
        "widths": {r.spec.name: r.width for r in runners},
    }


def probe(
    spec: Any,
    study: Callable[..., Any],
    *,
    dataset: Any = None,
    devices: int | None = None,
    nvml: Any = None,
    gpus: Any = None,
    fraction: float = PROBE_FRACTION,
    same_process: bool = False,
) -> StudyPlan:
    """Plans ``spec`` by probing it with ``study`` (:class:`sm2jax.study.Study`, which
    :func:`sm2jax.study.plan_study` passes): every cohort is built as the study builds it (same programs:
    the study then loads them from the persistent compilation cache), trained in three short calls
    and evaluated (:func:`probe_cohorts`), in a temporary folder; nothing is
    written anywhere else. Returns the :class:`StudyPlan` from those rates. ``same_process``: the
    study runs in this process next, and builds its programs from memory (its compilation is
    what the probe's second build cost), not from the persistent cache."""
    with tempfile.TemporaryDirectory(prefix="sm2jax-plan-") as tmp:
        probe_spec = dataclasses.replace(spec, idle_seconds=0.0, max_energy_joules=None, max_wall_seconds=None)
        study = study(
            os.path.join(tmp, "probe"),
            probe_spec,
            dataset=dataset,
            devices=devices,
            nvml=nvml,
            gpus=gpus,
            progress=False,
        )
        # Each call long enough for the meter: two of its resolutions (NVML: 1 s), at least 0.25 s.
        measured = study.probe_cohorts(fraction, max(0.25, 2 * study.energy.meter.resolution_s))
    rates = measured_rates(measured["records"], measured["widths"])
    if same_process:  # the study builds its programs from memory: what the second build cost
        rates = _rebuilt(rates, measured["again"])
    between = _between(measured, spec.idle_seconds)
    work = study.work
    eval_at_start = work.chance is None
    noise = max(spec.energy_noise, DEFAULT_PLAN_NOISE)
    plan = predict(
        spec,
        cohort_plans(spec),
        rates,
        work.steps,
        method=measured["method"],
        noise=noise,
        between=between,
        compiled=measured["compiles"] > 0 and not same_process,
        reused=same_process,
        eval_at_start=eval_at_start,
        test_evals=test_evals(work.data),
    )
    how = _how(measured, same_process)
    from sm2jax.store.folder import spec_digest

    return dataclasses.replace(plan, notes=[how, *plan.notes], spec_digest=spec_digest(spec.to_json()))


def _rebuilt(rates: dict[str, CohortRate], again: list[dict[str, Any]]) -> dict[str, CohortRate]:
    """``rates`` whose compilation is what the probe's second build of each cohort cost."""
    cost: dict[str, tuple[float | None, float]] = {}
    for r in again:
        if r["type"] == "window" and r.get("kind") == "compile":
            j, sec = cost.get(r["cohort"], (0.0, 0.0))
            cost[r["cohort"]] = (add_known(j, r["joules"]), sec + r["seconds"])
    return {
        c: dataclasses.replace(
            rate, compile_joules=cost.get(c, (0.0, 0.0))[0], compile_seconds=cost.get(c, (0.0, 0.0))[1]
        )
        for c, rate in rates.items()
    }


def _between(measured: dict[str, Any], idle_seconds: float) -> tuple[float, float, float]:
    """``(setup_seconds, seconds_per_phase, watts)`` of the host work between windows: the probe's
    span beyond its windows, less its one commit (and plus the study's idle baseline, which the
    estimate does not measure), each phase's commit, at the power drawn between windows."""
    span = measured["span"]
    gap_j, gap_s = span["between_joules"], span["between_seconds"]
    watts = gap_j / gap_s if gap_j and gap_s > 0 else 0.0
    commit = measured["commit_seconds"]
    idle = idle_seconds if measured["method"] != "estimated" else 0.0
    return max(gap_s - commit, 0.0) + idle, commit, watts


def _how(measured: dict[str, Any], same_process: bool) -> str:
    """The plan's note: how the probe ran and what compilation the study will pay."""
    if same_process:
        programs = "the study reuses its programs in this process (compilation: the probe's second build)"
    elif measured["compiles"]:
        programs = f"it compiled {measured['compiles']} program(s), which the study loads from the persistent cache"
    else:
        programs = "every program loaded from the persistent compilation cache"
    return (
        "probe: every cohort trained in three short calls (a call's cost and a step's measured apart); "
        f"{programs}; {measured['method']} energy"
    )
