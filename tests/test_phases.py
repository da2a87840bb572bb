"""A study's phase logic on constructed candidates (no training): candidates in, decision out."""

import json
import types

import numpy as np
import pytest

from sm2jax.phases import (
    DecisionRules,
    StudyState,
    cohort_candidates,
    planned_trial_steps,
    record_phase,
    smooth_cohort_rates,
)
from sm2jax.schedule.halving import decide_phase
from sm2jax.spec import StudySpec


def _rules_spec(**kw):
    return StudySpec(space={"learning_rate": {"type": "Fixed", "value": 1e-3}}, **kw)


def _rules(**kw):
    return DecisionRules.of(_rules_spec(**kw))


def _state(ids):
    state = StudyState()
    state.start(ids)
    return state


def _eval(scores, se=0.01):
    scores = np.asarray(scores, np.float64)
    return types.SimpleNamespace(scores=scores, metrics=scores, score_se=np.full(len(scores), se), losses=None)


def _candidates(state, scores, *, cohort="c", steps=10, bs=8, rules=None, chance=0.1, before=0):
    ids = sorted(int(t) for t in state.trials)
    rows = {
        "step": np.full(len(ids), steps),
        "active": np.array([np.isfinite(s) for s in scores]),
        "diverged_at": np.array([-1 if np.isfinite(s) else 3 for s in scores]),
    }
    before = {t: before for t in ids}
    return cohort_candidates(state, cohort, ids, _eval(scores), None, rows, bs, 800, before, chance, rules or _rules())


def test_candidates_carry_scores_samples_and_divergence_into_the_state():
    state = _state([0, 1, 2])
    cands = _candidates(state, [0.5, float("nan"), 0.9], steps=10, bs=8, before=16)
    assert [c.samples_spent for c in cands] == [80, 80, 80] and [c.samples_last for c in cands] == [64, 64, 64]
    assert [c.diverged for c in cands] == [False, True, False] and cands[1].diverged_at == 3
    assert cands[0].gain is None  # no earlier score: undefined, never a stand-in 0
    assert state.trials["1"]["score"] is None and state.trials["2"]["score"] == 0.9  # NaN is stored as null
    again = _candidates(state, [0.6, float("nan"), 0.95])
    assert again[0].gain == pytest.approx(0.1) and again[2].gain == pytest.approx(0.05)


def test_exploration_drops_only_clear_cases_and_keeps_the_rest():
    state = _state([0, 1, 2, 3])
    cands = _candidates(state, [0.9, 0.89, 0.1, float("nan")], chance=0.1)
    decision = decide_phase("explore", cands, _rules(), last=False)
    assert set(decision.kept) == {0, 1} and decision.selected is None
    reasons = {r["trial_id"]: r.get("reason_code") for r in decision.records if not r["kept"]}
    assert reasons[3] == "diverged" and reasons[2] == "not_learned"


def test_a_rung_keeps_ceil_n_over_eta_and_the_last_rung_selects_one_with_its_finalists():
    state = _state(list(range(7)))
    cands = _candidates(state, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], chance=None)
    rung = decide_phase("rung-1", cands, _rules(eta=3, mode="sh"), last=False)
    assert sorted(rung.kept) == [4, 5, 6]  # ceil(7 / 3) = 3 by rank
    floor = decide_phase("rung-1", cands, _rules(eta=3, keep_rule="floor", mode="sh"), last=False)
    assert sorted(floor.kept) == [5, 6]
    # SM2 drops, of that top, the clearly worse than its best: 0.5 and 0.6 are > 2 errors below 0.7.
    sm2 = decide_phase("rung-1", cands, _rules(eta=3, rung_z=2.0), last=False)  # the opt-in rung drop
    assert sm2.kept == [6]
    why = {r["trial_id"]: r["reason_code"] for r in sm2.records}
    assert why[4] == why[5] == "clearly_worse" and why[3] == "outside_top_k"
    # Seed noise measured at exploration widens that margin: 0.6 is then within it.
    noisy = decide_phase("rung-1", cands, _rules(eta=3, rung_z=2.0), last=False, seed_se=0.05)  # margin 0.144
    assert sorted(noisy.kept) == [5, 6]
    final = decide_phase("rung-2", cands, _rules(), last=True)
    assert final.kept == [6] and final.selected == 6
    assert {f["trial_id"] for f in final.finalists} == set(range(7))


def test_record_phase_charges_energy_smooths_cohort_rates_and_records_the_decision():
    rules = _rules()
    state = _state([0, 1])
    cands = _candidates(state, [0.2, 0.8], chance=None, before=0)  # 80 samples each in this phase
    decision = record_phase(
        state, "rung-1", cands, {0: 3.0, 1: 5.0}, {0: 2.0, 1: 4.0}, rules, last=False, energy_method="estimated"
    )
    assert [state.trials[t]["energy_spent"] for t in ("0", "1")] == [3.0, 5.0]
    assert state.cohort_energy["c"] == [{"phase": "rung-1", "joules": 6.0, "samples": 160}]
    assert cands[0].cohort_rate == pytest.approx(6.0 / 160)  # training joules per sample, evaluation left out
    assert [d["trial_id"] for d in state.decisions] == [r["trial_id"] for r in decision.records]
    assert all(d["energy_method"] == "estimated" and d["phase"] == "rung-1" for d in state.decisions)
    # A second phase adds to what each trial has spent; an unavailable figure makes it unavailable.
    cands = _candidates(state, [0.3, 0.9], chance=None, steps=20, before=80)
    record_phase(
        state, "rung-2", cands, {0: 1.0, 1: None}, {0: 1.0, 1: None}, rules, last=True, energy_method="estimated"
    )
    assert state.trials["0"]["energy_spent"] == 4.0 and state.trials["1"]["energy_spent"] is None
    assert state.selected == 1 and cands[0].cohort_rate is None  # one phase unavailable: no rate
    assert json.loads(json.dumps(state.to_json())) == StudyState.from_json(state.to_json()).to_json()


def test_smoothed_rates_skip_phases_without_samples():
    state = _state([0])
    (cand,) = _candidates(state, [0.5])
    history = {"c": [{"joules": 4.0, "samples": 0}, {"joules": 10.0, "samples": 100}, {"joules": 30.0, "samples": 100}]}
    smooth_cohort_rates(history, [cand], energy_noise=0.3)
    assert cand.cohort_rate == pytest.approx(0.2) and cand.energy_noise == 0.3


def test_planned_trial_steps_follow_successive_halving():
    phases = [("explore", 0.25), ("rung-1", 1.0), ("rung-2", 3.0), ("rung-3", 9.0)]
    steps = lambda budget: int(budget * 100)  # 100 steps per epoch
    # 9 trials: 25 steps each, then 75 more, then 3 trials x 200, then 1 trial x 600.
    assert planned_trial_steps(phases, steps, 9, 0, 0, 3) == 9 * 25 + 9 * 75 + 3 * 200 + 1 * 600
    # From rung-2 with 3 trials already 100 steps in.
    assert planned_trial_steps(phases, steps, 3, 100, 2, 3) == 3 * 200 + 1 * 600
    assert planned_trial_steps(phases, steps, 1, 900, 3, 3) == 0


def test_seed_replicates_measure_exploration_noise_and_are_never_selected():
    """Trials 4 and 5 replicate 0 and 2: their score differences set the seed noise exploration's
    decisions add; they stop after exploration, and the rungs rank on the split's noise alone."""
    import dataclasses

    rules = dataclasses.replace(_rules(eta=2, explore_keep=1.0), replicate_of={4: 0, 5: 2})
    state = _state(list(range(6)))
    energy = dict.fromkeys(range(6), 1.0)
    # 0 and 1 differ by 0.05: clearly apart on sampling noise (se 0.01) alone, tied once the pairs
    # (0.60 vs 0.53, 0.50 vs 0.57: seed noise sqrt((0.07^2 + 0.07^2) / 4 - 0.01^2) = 0.0485) are counted.
    cands = _candidates(state, [0.60, 0.55, 0.50, 0.20, 0.53, 0.57], rules=rules, chance=0.1)
    explore = record_phase(state, "explore", cands, energy, energy, rules, last=False, energy_method="estimated")
    assert state.seed_noise == [
        {"phase": "explore", "pairs": 2, "seed_se": pytest.approx(0.0485, abs=1e-4), "measured": True}
    ]
    assert set(explore.kept) == {0, 1, 2}  # 3 has not learned; the replicates stop
    originals = [r for r in explore.records if r["reason_code"] != "replicate"]
    assert all(r["seed_se"] == pytest.approx(0.0485, abs=1e-4) for r in originals)
    replica = {r["trial_id"]: r for r in explore.records if r["reason_code"] == "replicate"}
    assert replica.keys() == {4, 5} and replica[4]["replicate_of"] == 0 and not replica[4]["kept"]
    # Without the replicates, sampling noise alone drops 1 and 2 as clearly worse than 0.
    plain = _state(list(range(4)))
    bare = record_phase(
        plain,
        "explore",
        _candidates(plain, [0.60, 0.55, 0.50, 0.20]),
        energy,
        energy,
        _rules(),
        last=False,
        energy_method="estimated",
    )
    assert bare.kept == [0] and plain.seed_noise == []
    # A rung: 2 of 3 go on (ceil(3 / 2)), ranked on the split's noise (no seed noise added).
    cands = [c for c in _candidates(state, [0.70, 0.69, 0.50, 0.20, 0.6, 0.6], rules=rules) if c.trial_id < 3]
    rung = record_phase(state, "rung-1", cands, energy, energy, rules, last=True, energy_method="estimated")
    assert rung.kept == [0] and state.selected == 0 and all(r["seed_se"] == 0.0 for r in rung.records)


def test_replicates_are_evenly_spaced_per_cohort_with_other_keys_and_none_in_sh():
    space = {
        "learning_rate": {"type": "LogUniform", "low": 1e-3, "high": 1e-1, "num": 8},
        "batch_size": {"type": "Categorical", "choices": [16, 64]},
    }
    spec = StudySpec(space=space, replicates=2)
    configs, twins = spec.trial_configs(), spec.replicate_of()
    assert len(configs) == 16 + 4 and sorted(twins) == [16, 17, 18, 19]
    by_id = {c.trial_id: c for c in configs}
    for twin, original in twins.items():
        a, b = by_id[twin].values, by_id[original].values
        assert {k for k in a if a[k] != b[k]} == {"seed"}  # the same hyperparameters, other keys
    assert [by_id[o]["batch_size"] for o in twins.values()] == [16, 16, 64, 64]  # two per cohort of 8
    grid = sorted({c["learning_rate"] for c in configs})
    assert [by_id[o]["learning_rate"] for o in twins.values()][:2] == [grid[2], grid[6]]  # evenly spaced
    assert StudySpec(space=space, mode="sh").replicate_of() == {}  # plain SH has none
    one_cohort = StudySpec(space={"learning_rate": space["learning_rate"]}, replicates=5)
    assert one_cohort.replicate_of().keys() == {8, 9}  # at most one per four configurations


def test_exploration_halves_each_cohort_by_default_and_an_older_study_decides_as_before():
    """A spec's exploration halves each cohort (``explore_keep`` 0.5); a study folder from before
    the halving (no such field) resumes with 1, every configuration that passes the clear margin."""
    from sm2jax.spec import current_form

    state = _state(list(range(4)))
    # Scores within the sampling noise of each other: nothing is clearly worse.
    decision = record_phase(
        state,
        "explore",
        _candidates(state, [0.50, 0.49, 0.51, 0.48], chance=0.1),
        dict.fromkeys(range(4), 1.0),
        dict.fromkeys(range(4), 1.0),
        _rules(),
        last=False,
        energy_method="estimated",
    )
    assert _rules().explore_keep == 0.5 and decision.kept == [0, 2]  # the best half of the cohort
    old = {k: v for k, v in _rules_spec().to_json().items() if k != "explore_keep"}
    assert current_form(old)["explore_keep"] == 1.0
    with pytest.raises(ValueError, match=r"explore_keep must be in \(0, 1\].*--set explore_keep=0.5"):
        _rules(explore_keep=1.5)
