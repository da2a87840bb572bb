"""SM2 decision logic on constructed candidates (no training)."""

import math

import pytest

from sm2jax.scheduler import (
    Candidate,
    exploration_filter,
    halve,
    hyperband_brackets,
    normalise,
    pareto_objective,
    performance_objective,
    rank,
    resolve_objective,
    rung_budgets,
    sm2_objective,
    steps_for,
)


def cand(tid, score, energy=10.0, *, gain=0.1, last=None, samples=100, total=1000, diverged=False, cohort="c"):
    return Candidate(tid, cohort, score, gain, energy, energy if last is None else last, samples, samples, total, diverged, 5 if diverged else -1)


def test_hyperband_brackets_match_li_et_al_2018():
    brackets = hyperband_brackets(81, 3)
    assert [(b["n"], b["r"]) for b in brackets] == [(81, 1), (34, 3), (15, 9), (8, 27), (5, 81)]
    assert [b["s"] for b in brackets] == [4, 3, 2, 1, 0]
    # Li et al. (JMLR 2018), Table 1: (n_i, r_i) per rung of every bracket for R = 81, eta = 3.
    published = [
        [(81, 1), (27, 3), (9, 9), (3, 27), (1, 81)],
        [(34, 3), (11, 9), (3, 27), (1, 81)],
        [(15, 9), (5, 27), (1, 81)],
        [(8, 27), (2, 81)],
        [(5, 81)],
    ]
    assert [[(r["n"], r["r"]) for r in b["rungs"]] for b in brackets] == published
    # The R = 243 example (bracket s = 4): 98 @ 3, 32 @ 9, 10 @ 27, 3 @ 81, 1 @ 243.
    s4 = next(b for b in hyperband_brackets(243, 3) if b["s"] == 4)
    assert [(r["n"], r["r"]) for r in s4["rungs"]] == [(98, 3), (32, 9), (10, 27), (3, 81), (1, 243)]


def _algorithm_1(R, eta):
    """Li et al.'s Algorithm 1, transcribed literally with integer resources (the reference)."""
    s_max = 0
    while eta ** (s_max + 1) <= R:
        s_max += 1
    out = []
    for s in range(s_max, -1, -1):
        n = -(-(s_max + 1) * eta**s // (s + 1))
        out.append([(n * 1 // eta**i, R * eta**i // eta**s) for i in range(s + 1)])
    return out


@pytest.mark.parametrize("R, eta", [(27, 3), (81, 3), (243, 3), (16, 2), (64, 4)])
def test_hyperband_plans_equal_algorithm_1(R, eta):
    ours = [[(r["n"], r["r"]) for r in b["rungs"]] for b in hyperband_brackets(R, eta, integral=True)]
    assert ours == _algorithm_1(R, eta)


def test_hyperband_integral_budgets_round_down_like_the_paper():
    (s4,) = [b for b in hyperband_brackets(100, 3, integral=True) if b["s"] == 4]
    assert [r["r"] for r in s4["rungs"]] == [1, 3, 11, 33, 100]


def test_halving_keeps_floor_in_hyperband_and_ceil_in_successive_halving():
    candidates = [cand(i, 0.1 * i) for i in range(10)]
    assert len(halve(candidates, performance_objective, 3, keep="floor")[0]) == 3
    assert len(halve(candidates, performance_objective, 3, keep="ceil")[0]) == 4
    assert len(halve(candidates[:2], performance_objective, 3, keep="floor")[0]) == 1  # at least one
    with pytest.raises(ValueError, match="keep"):
        halve(candidates, performance_objective, 3, keep="round")


def test_rung_budgets_and_units():
    assert rung_budgets(1, 9, 3) == [1, 3, 9]
    assert rung_budgets(1, 10, 3) == [1, 3, 9, 10]
    assert rung_budgets(5, 5, 3) == [5]
    with pytest.raises(ValueError):
        rung_budgets(2, 1, 3)
    with pytest.raises(ValueError):
        rung_budgets(1, 9, 1)
    assert steps_for(0.25, "epochs", 32, 44) == 11
    assert steps_for(100, "samples", 32, 44) == 4
    assert steps_for(7, "steps", 32, 44) == 7
    with pytest.raises(ValueError, match="unit"):
        steps_for(1, "hours", 32, 44)


@pytest.mark.parametrize("n, eta, keep", [(9, 3, 3), (10, 3, 4), (8, 2, 4), (1, 3, 1), (2, 3, 1)])
def test_successive_halving_keeps_the_top_one_over_eta(n, eta, keep):
    candidates = [cand(i, score=0.1 * ((i * 7) % n)) for i in range(n)]
    kept, records = halve(candidates, performance_objective, eta)
    best = sorted(candidates, key=lambda c: (-c.score, c.trial_id))[:keep]
    assert kept == [c.trial_id for c in best]
    assert sum(r["kept"] for r in records) == keep and len(records) == n


def test_diverged_candidates_rank_last_and_are_dropped():
    candidates = [cand(0, 0.9, diverged=True), cand(1, 0.2), cand(2, float("nan"))]
    kept, records = halve(candidates, performance_objective, eta=1 + 1)
    assert kept == [1]
    reasons = {r["trial_id"]: r["reason"] for r in records}
    assert reasons[0].startswith("diverged at step 5") and "not finite" in reasons[2]


def test_exploration_drops_a_dominated_config_and_keeps_the_pareto_front():
    candidates = [
        cand(0, 0.90, energy=100.0),  # best score: Pareto-optimal
        cand(1, 0.70, energy=20.0),  # cheapest: Pareto-optimal
        cand(2, 0.60, energy=200.0),  # worse and dearer than 0 by more than the margins: dominated
        cand(3, 0.89, energy=95.0),  # within the score margin of 0: kept
        cand(4, 0.95, energy=50.0, diverged=True),  # diverged
    ]
    kept, records = exploration_filter(candidates, score_tolerance=0.02, energy_tolerance=0.1)
    assert kept == [0, 1, 3]
    by_id = {r["trial_id"]: r for r in records}
    assert by_id[2]["dominated_by"] in (0, 1, 3) and "dominated by trial" in by_id[2]["reason"]
    assert by_id[4]["reason"].startswith("diverged")


def test_without_energy_exploration_only_drops_divergence():
    candidates = [cand(0, 0.9, energy=None), cand(1, 0.1, energy=None), cand(2, 0.5, energy=None, diverged=True)]
    kept, records = exploration_filter(candidates)
    assert kept == [0, 1]
    assert "energy unavailable" in records[0]["reason"]


def test_sm2_objective_blends_performance_energy_and_progress():
    objective = sm2_objective(alpha=0.5, beta=0.3)
    a = cand(0, 0.9, energy=100.0, gain=0.10)  # best score, dearest
    b = cand(1, 0.8, energy=10.0, gain=0.30)  # cheaper, learns faster per joule
    terms = objective([a, b])
    assert terms[0]["P_hat"] == 1.0 and terms[1]["P_hat"] == 0.0
    assert terms[0]["E_hat"] == 1.0 and terms[1]["E_hat"] == 0.0
    assert terms[1]["G_hat"] == 1.0
    assert terms[0]["objective"] == pytest.approx(0.5) and terms[1]["objective"] == pytest.approx(0.5)
    assert rank([a, b], objective)[0][0].trial_id == 0  # tie broken by trial id
    assert rank([a, b], sm2_objective(alpha=0.3, beta=0.5))[0][0].trial_id == 1  # energy-heavier blend
    with pytest.raises(ValueError):
        sm2_objective(alpha=0.8, beta=0.3)


def test_float_noise_in_equal_energy_shares_is_not_amplified():
    e = 1.0 / 3.0
    noisy = [e, e, e + 2 * math.ulp(e)]  # the last share of a window absorbs rounding
    assert normalise(noisy) == [0.5, 0.5, 0.5]
    objective = sm2_objective()
    ranked = rank([cand(i, s, energy=en) for i, (s, en) in enumerate(zip([0.5, 0.7, 0.6], noisy))], objective)
    assert [c.trial_id for c, _ in ranked] == [1, 2, 0]  # by score alone


def test_energy_unavailable_falls_back_to_performance():
    terms = sm2_objective()([cand(0, 0.5, energy=None), cand(1, 0.7, energy=None)])
    assert [t["objective"] for t in terms] == [0.0, 1.0] and "unavailable" in terms[0]["note"]


def test_pareto_objective_orders_fronts():
    candidates = [cand(0, 0.9, energy=100.0), cand(1, 0.5, energy=10.0), cand(2, 0.4, energy=200.0), cand(3, 0.7, energy=50.0)]
    terms = pareto_objective(candidates)
    assert [t["front"] for t in terms] == [0, 0, 1, 0]
    ranked = [c.trial_id for c, _ in rank(candidates, pareto_objective)]
    assert ranked[-1] == 2 and set(ranked[:2]) == {0, 1}  # extremes of the front first (infinite crowding)


def test_user_callable_objective():
    def cheapest(candidates):
        return [{"objective": -c.energy_spent} for c in candidates]

    objective = resolve_objective(cheapest)
    kept, records = halve([cand(0, 0.9, energy=5.0), cand(1, 0.1, energy=1.0)], objective, eta=2)
    assert kept == [1]
    with pytest.raises(ValueError, match="unknown objective"):
        resolve_objective("fastest")


def test_undefined_terms_are_null_never_zero():
    first = Candidate(0, "c", 0.5, None, 10.0, 10.0, 100, 100, 1000)  # no earlier score: no gain
    terms = first.terms()
    assert terms["gain"] is None and terms["plateaued"] is None and terms["progress_per_joule"] is None
    later = cand(1, 0.6, gain=0.0)
    assert later.plateaued is True and later.progress_per_joule == 0.0  # a measured zero gain stays a zero


def test_pareto_with_unavailable_energy_ranks_on_score_and_says_so():
    unknown = [cand(0, 0.9, energy=None), cand(1, 0.5, energy=1.0), cand(2, 0.7, energy=2.0)]
    records = pareto_objective(unknown)
    assert all(r["note"] == "energy unavailable: performance only" for r in records)
    assert sorted(range(3), key=lambda i: -records[i]["objective"]) == [0, 2, 1]


def test_every_decision_has_a_reason_code():
    candidates = [cand(0, 0.9), cand(1, 0.2), cand(2, float("nan"), diverged=True)]
    _, halved = halve(candidates, performance_objective, 3)
    _, explored = exploration_filter(candidates)
    assert [r["reason_code"] for r in halved] == ["top_k", "outside_top_k", "diverged"]
    assert {r["reason_code"] for r in explored} <= {"not_dominated", "dominated", "diverged", "score_not_finite", "energy_unavailable"}
    assert explored[2]["reason_code"] == "diverged"
