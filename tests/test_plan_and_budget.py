"""A study planned before it runs and capped while it runs: rates from constructed windows, the
cap's decision, the stop and its continuation, the cost-to-target objective, and (slow) a plan of
the default digits study against what it then measured."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from sm2jax.budget import Spent, first_phase_fits, spent_so_far, stop_reason
from sm2jax.objectives import cost_to_target_objective
from sm2jax.phases import DecisionRules, StudyState, cohort_candidates, continue_after_stop, record_phase
from sm2jax.plan import CohortPlan, PhaseCost, StudyPlan, plan_vs_actual, predict
from sm2jax.rates import CohortRate, Range, measured_rates
from sm2jax.schedule.candidates import Candidate
from sm2jax.spec import StudySpec


def _window(phase, kind, joules, seconds, trials, steps=0, cohort="c", attempt=1):
    """A ledger window and its trial records, as the ledger holds them."""
    head = {"type": "window", "phase": phase, "kind": kind, "cohort": cohort, "joules": joules}
    head |= {"seconds": seconds, "attempt": attempt, "method": "nvml-counter"}
    return [head] + [
        {"type": "trial", "phase": phase, "kind": kind, "cohort": cohort, "trial_id": t, "steps": steps} for t in trials
    ]


def test_rates_separate_a_cohorts_warm_up_its_calls_and_its_steps():
    """Windows costing 2 J of warm-up (first phase), 0.5 J a call and 0.01 J a step of a chunk of
    two rows: the fit gives each back, with evaluation per trial and compilation in all."""
    records = _window("compile", "compile", 3.0, 1.0, [0, 1, 2, 3])
    records += _window("explore", "train", 2.0 + 0.5 + 10 * 2 * 0.01, 1.0, [0, 1, 2, 3], steps=10)
    records += _window("explore", "eval", 0.08, 0.1, [0, 1, 2, 3])
    records += _window("rung-1", "train", 0.5 + 20 * 2 * 0.01, 1.0, [0, 1, 2, 3], steps=20)
    records += _window("rung-2", "train", 0.5 + 60 * 1 * 0.01, 1.0, [0, 1], steps=60)
    rate = measured_rates(records, {"c": 2})["c"]
    assert rate.call_joules == pytest.approx(0.5) and rate.step_joules == pytest.approx(0.01)
    assert rate.warmup_joules == pytest.approx(2.0) and rate.eval_joules == pytest.approx(0.02)
    assert rate.compile_joules == pytest.approx(3.0) and rate.width == 2
    # Three trials still step two chunks: 0.5 + 10 x 2 x 0.01 + 3 x 0.02.
    assert rate.train(3, 10)[0] == pytest.approx(0.76)
    # A window without a figure makes the energy rates unknown, never a stand-in zero.
    blind = measured_rates([*records[:-3], *_window("rung-2", "train", None, 1.0, [0, 1], steps=60)], {"c": 2})
    assert blind["c"].step_joules is None and blind["c"].train(2, 5)[0] is None


def _spec(**kw):
    space = {"learning_rate": {"type": "Categorical", "choices": [0.1, 0.01, 0.001]}}
    return StudySpec(space=space, **{"explore_budget": 0.5, "min_budget": 1, "max_budget": 9, "eta": 3, **kw})


def test_a_plan_counts_each_phases_trials_and_states_its_range():
    """Two cohorts of 6 configurations (a replicate each); steps are budgets x 10. Exploration
    trains all 14 (exact), the first rung 1 to ceil(0.5 x 6) x 2 = 6, then 2, then 1."""
    spec = _spec(explore_keep=0.5)
    cohorts = [CohortPlan("a", 6, 1, 8), CohortPlan("b", 6, 1, 8)]
    rates = {c: CohortRate(0.01, 0.001, 0.1, 0.01, compile_joules=4.0, compile_seconds=2.0) for c in "ab"}
    plan = predict(spec, cohorts, rates, lambda budget, bs: int(budget * 10), method="nvml-counter", noise=1.0)
    lines = {line.name: line for line in plan.lines}
    assert [line.name for line in plan.lines] == ["compile", "explore", "rung-1", "rung-2", "rung-3", "between windows"]
    assert lines["explore"].trials == (14, 14)
    explore = 14 * (5 * 0.01 + 0.1)  # 5 steps and one evaluation each
    assert lines["explore"].joules.mid == pytest.approx(explore)
    assert lines["explore"].joules.lo == pytest.approx(explore / 2) and lines["explore"].joules.hi == pytest.approx(
        2 * explore
    )
    assert [lines[p].trials for p in ("rung-1", "rung-2", "rung-3")] == [(1, 6), (1, 2), (1, 1)]
    assert lines["compile"].joules.mid == pytest.approx(8.0)
    total = plan.total()
    assert total.joules.mid == pytest.approx(sum(line.joules.mid for line in plan.lines))
    assert all(line.joules.lo <= line.joules.mid <= line.joules.hi for line in plan.lines)
    assert plan.first_phase().joules.mid == pytest.approx(8.0 + explore)
    assert StudyPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_a_cap_that_allows_two_phases_stops_after_two():
    """0.1 J a trial-step and per evaluation, 20 J allowed. After exploration (4.4 J spent) the
    first rung needs 8.4 J, up to 12.6 J: it starts. After it (12.8 J spent), the last rung needs
    8.3 J, up to 12.5 J, and 7.2 J are left: the study stops, saying so."""
    records = _window("explore", "train", 4.0, 4.0, [0, 1, 2, 3], steps=10)
    records += _window("explore", "eval", 0.4, 0.4, [0, 1, 2, 3])
    spent = spent_so_far(records, 1, now=(4.4, 4.4), windows=(4.4, 4.4), phases_done=1)
    assert spent == Spent(4.4, 4.4, 0.0, 0.0)
    caps = (20.0, None)
    assert stop_reason(records, spent, caps, "rung-1", {"c": 4}, {"c": 20}, last=False, noise=0.5) is None
    records += _window("rung-1", "train", 8.0, 8.0, [0, 1, 2, 3], steps=20)
    records += _window("rung-1", "eval", 0.4, 0.4, [0, 1, 2, 3])
    spent = spent_so_far(records, 1, now=(12.8, 12.8), windows=(12.8, 12.8), phases_done=2)
    why = stop_reason(records, spent, caps, "rung-2", {"c": 2}, {"c": 40}, last=True, noise=0.5)
    assert why == "rung-2 would need 8.3 J (up to 12.4 J) and 7.2 J of the 20.0 J energy budget are left"
    # Nothing capped, or a raised budget: it goes on.
    assert stop_reason(records, spent, (None, None), "rung-2", {"c": 2}, {"c": 40}, last=True, noise=0.5) is None
    assert stop_reason(records, spent, (30.0, None), "rung-2", {"c": 2}, {"c": 40}, last=True, noise=0.5) is None
    # The wall-time cap reads the same way, in seconds.
    why = stop_reason(records, spent, (None, 15.0), "rung-2", {"c": 2}, {"c": 40}, last=True, noise=0.5)
    assert "wall-time budget" in why


def test_earlier_attempts_count_by_their_whole_span_and_a_killed_one_by_its_windows():
    records = _window("explore", "train", 5.0, 5.0, [0], steps=10, attempt=1)
    records += [{"type": "span", "attempt": 1, "joules": 7.0, "seconds": 6.0}]
    records += _window("rung-1", "train", 3.0, 2.0, [0], steps=10, attempt=2)  # killed: no span record
    spent = spent_so_far(records, 3, now=(2.0, 1.0), windows=(1.0, 0.5), phases_done=1)
    assert spent.joules == pytest.approx(7.0 + 3.0 + 2.0) and spent.seconds == pytest.approx(6.0 + 2.0 + 1.0)
    assert spent.between_seconds == pytest.approx(0.5) and spent.between_watts == pytest.approx(2.0)


def _rules():
    return DecisionRules.of(_spec(mode="sh"))


def _candidates(state, scores):
    ids = sorted(int(t) for t in state.trials)
    rows = {"step": np.full(len(ids), 10), "active": np.ones(len(ids), bool), "diverged_at": np.full(len(ids), -1)}
    ev = types.SimpleNamespace(
        scores=np.asarray(scores), metrics=np.asarray(scores), score_se=np.full(len(ids), 0.01), losses=None
    )
    return cohort_candidates(state, "c", ids, ev, None, rows, 8, 800, {t: 0 for t in ids}, None, _rules())


def test_a_stop_selects_the_best_of_the_last_phase_and_a_raised_budget_takes_it_back():
    state = StudyState()
    state.start(range(6))
    cands = _candidates(state, [0.1, 0.5, 0.3, 0.9, 0.7, 0.2])
    joules = {t: 1.0 for t in range(6)}
    decision = record_phase(
        state,
        "rung-1",
        cands,
        joules,
        joules,
        _rules(),
        last=False,
        energy_method="estimated",
        stop=lambda d: ("rung-2", f"rung-2 would need more; it kept {sorted(d.kept)}"),
    )
    assert decision.selected == 3 and state.selected == 3 and decision.kept == [3]
    assert state.stopped["kept"] == [3, 4] and state.stopped["before"] == "rung-2"
    assert state.stopped["reason"] == "rung-2 would need more; it kept [3, 4]"
    assert {f["trial_id"] for f in state.finalists} == set(range(6))
    assert sum(d["kept"] for d in state.decisions) == 1
    back = StudyState.from_json(json.loads(json.dumps(state.to_json())))  # what a resume reads
    assert continue_after_stop(back, attempt=2) == [3, 4]
    assert back.stopped is None and back.selected is None and back.finalists == []
    assert sorted(d["trial_id"] for d in back.decisions if d["kept"]) == [3, 4]
    assert back.stops == [{"phase": "rung-1", "before": "rung-2", "reason": state.stopped["reason"], "continued_by": 2}]
    # No stop asked for, or none needed: the phase decides as before.
    plain = StudyState()
    plain.start(range(6))
    kept = record_phase(
        plain,
        "rung-1",
        _candidates(plain, [0.1, 0.5, 0.3, 0.9, 0.7, 0.2]),
        joules,
        joules,
        _rules(),
        last=False,
        energy_method="estimated",
        stop=lambda d: None,
    ).kept
    assert kept == [3, 4] and plain.stopped is None and plain.selected is None


def test_cost_to_target_ranks_by_the_energy_to_reach_the_target():
    def cand(t, score, joules):
        return Candidate(t, "c", score, None, joules, None, 80, 80, 800)

    ranked = cost_to_target_objective(0.8)(
        [cand(0, 0.95, 9.0), cand(1, 0.82, 3.0), cand(2, 0.79, 1.0), cand(3, 0.6, 0.5)]
    )
    order = sorted(range(4), key=lambda i: -ranked[i]["objective"])
    assert order == [1, 0, 2, 3]  # reached: the cheaper first; then the rest by score
    assert ranked[1]["energy_to_target"] == 3.0 and ranked[2]["energy_to_target"] is None
    blind = cost_to_target_objective(0.8)([cand(0, 0.95, None), cand(1, 0.82, 3.0)])
    assert blind[0]["objective"] > blind[1]["objective"] and "unavailable" in blind[0]["note"]
    with pytest.raises(ValueError, match="needs a target score: add --set target_score"):
        _spec(objective="cost_to_target")
    rules = DecisionRules.of(_spec(objective="cost_to_target", target_score=0.8))
    assert rules.objective([cand(0, 0.95, 9.0), cand(1, 0.82, 3.0)])[1]["reached"]


def test_bad_budgets_are_one_line():
    for field in ("max_energy_joules", "max_wall_seconds"):
        for value in (0, -1.0):
            with pytest.raises(ValueError, match=f"{field} must be > 0"):
                _spec(**{field: value})
    plan = StudyPlan(
        [
            PhaseCost("compile", None, Range(5.0, 10.0, 20.0), Range(1.0, 2.0, 4.0)),
            PhaseCost("explore", (9, 9), Range(15.0, 30.0, 60.0), Range(3.0, 6.0, 12.0)),
            PhaseCost("rung-1", (1, 4), Range(1.0, 5.0, 10.0), Range(1.0, 2.0, 4.0)),
        ],
        "nvml-counter",
        1.0,
    )
    with pytest.raises(
        ValueError, match=r"below what the plan says compile \+ explore needs: ~40.0 J \(20.0 J .. 80.0 J\)"
    ):
        first_phase_fits(_spec(max_energy_joules=39.0), plan)
    with pytest.raises(ValueError, match=r"wall-time budget \(5 s\) is below .* ~8 s"):
        first_phase_fits(_spec(max_wall_seconds=5.0), plan)
    first_phase_fits(_spec(max_energy_joules=41.0, max_wall_seconds=9.0), plan)


def test_plan_against_actual_says_what_was_inside_its_range():
    plan = StudyPlan([PhaseCost("explore", (3, 3), Range(1.0, 2.0, 4.0), Range(1.0, 2.0, 4.0))], "rapl", 1.0)
    rows = plan_vs_actual(plan.to_json(), {"explore": {"joules": 5.0, "seconds": 2.5}}, {"joules": 6.0, "seconds": 3.0})
    assert [(r["name"], r["joules_within"], r["seconds_within"]) for r in rows] == [
        ("explore", False, True),
        ("total", False, True),
    ]
    assert plan_vs_actual(None, {}, None) is None


@pytest.mark.slow
def test_the_plan_of_the_default_digits_study_holds_what_it_then_measures(tmp_path):
    """`sm2jax plan` then `sm2jax run` with the same arguments, as a user runs them (two processes:
    the run loads its programs from the persistent cache): the whole span's energy and wall time
    fall inside the plan's stated range."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    where = str(tmp_path / "d")
    cmd = [sys.executable, "-m", "sm2jax.cli"]
    plan = subprocess.run([*cmd, "plan", "--dir", where, "--no-progress"], capture_output=True, text=True, env=env)
    assert plan.returncode == 0, plan.stderr
    assert "total" in plan.stdout and "between windows" in plan.stdout
    run = subprocess.run(
        [*cmd, "run", "--dir", where, "--no-progress", "--json"], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    total = next(r for r in results["plan"] if r["name"] == "total")
    assert total["joules_within"] and total["seconds_within"], total
    report = subprocess.run([*cmd, "report", where, "--no-files"], capture_output=True, text=True, env=env)
    assert "plan against actual" in report.stdout


@pytest.mark.slow
def test_a_capped_study_stops_cleanly_and_a_raised_budget_continues_it(tmp_path):
    """Plain successive halving (energy decides nothing, so a stop changes no decision) capped at
    half of what it needs: it plans, starts no phase it predicts it cannot afford, stops before
    a rung with its best configuration so far and a clear line; resumed with a raised budget it
    ends where the uncapped study ends."""
    from sm2jax.report import format_results
    from sm2jax.study import Study

    space = {
        "learning_rate": {"type": "Categorical", "choices": [0.003, 0.01, 0.03]},
        "batch_size": {"type": "Fixed", "value": 32},
    }
    spec = StudySpec(
        space=space,
        dataset="digits",
        mode="sh",
        min_budget=1,
        max_budget=9,
        eta=3,
        idle_seconds=0.0,
        probe_width=False,
        energy_method="estimated",
    )
    Study(tmp_path / "cold", spec, progress=False).run()  # its programs in memory, as the capped study's will be
    free = Study(tmp_path / "free", spec, progress=False).run()
    cap = free["whole_span"]["joules"] * 0.5
    capped = Study(tmp_path / "capped", StudySpec(**{**spec.to_json(), "max_energy_joules": cap}), progress=False).run()
    spans = (free["whole_span"]["joules"], capped["whole_span"]["joules"], cap)
    assert capped["stopped"] is not None and capped["selected"] is not None, spans
    phase = capped["stopped"]["phase"]
    scores = {d["trial_id"]: d.get("score") for d in capped["decisions"] if d["phase"] == phase}
    assert capped["selected"]["trial_id"] == max(scores, key=lambda t: scores[t])
    # No phase started that its upper prediction said the budget could not afford, and the stop
    # was one it could not. (Whether the whole span then stays inside the budget is as good as the
    # predictions: on a loaded 2-core machine a phase's host work can run past its upper end.)
    checks = capped["budget_checks"]
    assert checks and checks[-1]["reason"] == capped["stopped"]["reason"]
    for c in checks:
        fits = c["spent_joules"] + c["joules"]["hi"] <= c["max_joules"]
        assert fits == (c["reason"] is None), c
    assert capped["whole_span"]["joules"] < free["whole_span"]["joules"], spans
    assert f"STOPPED BY THE BUDGET after {phase}" in format_results(capped)
    assert os.path.exists(tmp_path / "capped" / "plan.json") and capped["plan"]
    raised = Study(tmp_path / "capped", StudySpec(**{**spec.to_json(), "max_energy_joules": 100 * cap}), progress=False)
    done = raised.run()
    assert done["stopped"] is None and done["stops"][0]["phase"] == phase
    assert done["selected"]["trial_id"] == free["selected"]["trial_id"]


@pytest.mark.slow
def test_a_budget_below_the_first_phase_or_not_positive_is_one_line_before_anything_is_written(tmp_path, capsys):
    from sm2jax.cli import main

    where = tmp_path / "d"
    assert main(["run", "--dir", str(where), "--budget-kwh", "1e-9", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is below what the plan says compile + explore needs: ~" in err[0]
    assert "raise it to at least --budget-kwh" in err[0] and not where.exists()
    for flag, value in (("--budget-kwh", "0"), ("--budget-hours", "-1")):
        assert main(["run", "--dir", str(where), flag, value, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "must be > 0" in err[0] and not where.exists()
