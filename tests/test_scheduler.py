"""SM2 decision logic on constructed candidates (no training)."""

import dataclasses
import json
import math
import pathlib
import random

import pytest

from sm2jax.budgets import hyperband_brackets, rung_budgets, steps_for
from sm2jax.objectives import (
    blend_objective,
    normalise,
    pareto_objective,
    performance_objective,
    resolve_objective,
    sm2_objective,
)
from sm2jax.schedule.candidates import Candidate, rank, seed_noise
from sm2jax.schedule.halving import exploration_filter, finalist_front, halve


def cand(
    tid,
    score,
    energy=10.0,
    *,
    gain=0.1,
    last=None,
    samples=100,
    total=1000,
    diverged=False,
    cohort="c",
    se=0.0,
    start=None,
    chance=None,
    rate=None,
    noise=0.2,
    val_loss=None,
):
    return Candidate(
        tid,
        cohort,
        score,
        gain,
        energy,
        energy if last is None else last,
        samples,
        samples,
        total,
        diverged,
        5 if diverged else -1,
        score_se=se,
        start_score=start,
        chance_score=chance,
        cohort_rate=rate,
        energy_noise=noise,
        val_loss=val_loss,
    )


def sm2_cand(tid, score, rate, *, cohort=None, se=0.01, spent=100, total=900, **kw):
    """A candidate as a study builds it: a score with its standard error and its cohort's energy rate."""
    return cand(
        tid,
        score,
        energy=rate * spent,
        samples=spent,
        total=total,
        cohort=cohort or f"rate{rate:g}",
        se=se,
        rate=rate,
        **kw,
    )


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


def _hyperband_spec(**fields):
    from sm2jax.space import LogUniform, SearchSpace
    from sm2jax.spec import StudySpec

    space = SearchSpace({"learning_rate": LogUniform(1e-3, 1e-1, num=3)}).to_json()
    return StudySpec(space=space, **{"mode": "hyperband", "budget_unit": "steps", "max_budget": 81, "eta": 3, **fields})


def test_hyperband_brackets_are_the_rounds_of_one_study():
    """Each bracket is a round with its own size and rungs (Li et al.'s Table 1), labelled as a
    study's rounds are; the study makes every bracket's configurations, sampled (a grid's space
    drawn at random), and ranks on the score, keeping floor(n / eta) and exploring nothing."""
    from sm2jax.rounds import propose, round_plans, schedule

    spec = _hyperband_spec(explore_budget=0.5)  # (ignored: Hyperband explores nothing)
    plans = round_plans(spec)
    brackets = hyperband_brackets(81, 3, integral=True)
    assert [p.size for p in plans] == [b["n"] for b in brackets] == [81, 34, 15, 8, 5]
    assert [[b for _, b in p.phases] for p in plans] == [[r["r"] for r in b["rungs"]] for b in brackets]
    assert [dict(p.about)["bracket"] for p in plans] == [4, 3, 2, 1, 0]
    steps = schedule(spec)
    assert [s.label for s in steps if s.round == 2] == ["r2.rung-1", "r2.rung-2", "r2.rung-3", "r2.rung-4"]
    assert [s.round for s in steps if s.round_end] == [1, 2, 3, 4, 5]
    assert {s.budget for s in steps if s.round_end} == {81.0}  # every bracket's selection at R
    assert spec.configuration_count() == 81 + 34 + 15 + 8 + 5
    ran = spec.effective()
    assert (ran.sampler, ran.keep_rule, ran.objective, ran.explore_budget) == ("random", "floor", "performance", 0.0)
    assert spec.sampler == "grid" and spec.explore_budget == 0.5  # the spec keeps what was written
    assert _hyperband_spec(sampler="tpe").effective().sampler == "tpe"  # BOHB: the model learns per bracket
    for sampler in ("random", "sobol", "tpe"):  # exactly a bracket's n: no rounding up to whole cohorts
        bohb = _hyperband_spec(sampler=sampler, max_budget=9)
        assert [len(propose(bohb, k, [], first_id=0)) for k in (1, 2, 3)] == [9, 5, 3]
    assert len(propose(dataclasses.replace(bohb, mode="sh", num_samples=9), 1, [], first_id=0)) == 16  # (SH may)


def test_hyperband_refuses_rounds_extensions_and_budgets_in_one_line():
    for fields in ({"rounds": 2, "num_samples": 8}, {"extensions": [{"samples": 4, "rounds": 1}]}):
        with pytest.raises(ValueError, match=r"Hyperband's rounds are its brackets .*warm_start") as err:
            _hyperband_spec(**fields)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"Hyperband runs one per bracket: cap a study of --mode sm2 or sh"):
        _hyperband_spec(max_energy_joules=1e3)


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


def test_exploration_drops_what_has_not_learned_and_what_is_clearly_dominated():
    candidates = [
        sm2_cand(0, 0.80, 1.0, cohort="small", start=0.10, chance=0.11),  # best of its cohort, cheapest
        sm2_cand(1, 0.78, 1.0, cohort="small", start=0.10, chance=0.11),  # tied with 0 within the noise: kept
        sm2_cand(2, 0.50, 1.0, cohort="small", start=0.10, chance=0.11),  # clearly worse than 0 in its cohort
        sm2_cand(3, 0.12, 1.0, cohort="small", start=0.10, chance=0.11),  # has not learned (chance)
        sm2_cand(4, 0.85, 10.0, cohort="big", start=0.10, chance=0.11),  # better but dearer: Pareto, kept
        sm2_cand(5, 0.60, 10.0, cohort="big", start=0.10, chance=0.11),  # clearly worse than 4 in its cohort
        sm2_cand(
            6, 0.70, 5.0, cohort="mid", start=0.10, chance=0.11
        ),  # worse and dearer than 0, but best of its cohort: kept
        sm2_cand(7, 0.99, 0.5, cohort="mid", diverged=True),
    ]
    kept, records = exploration_filter(candidates, z=2.0)
    assert kept == [0, 1, 4, 6]
    code = {r["trial_id"]: r["reason_code"] for r in records}
    assert code == {
        0: "not_dominated",
        1: "not_dominated",
        2: "dominated_in_cohort",
        3: "not_learned",
        4: "not_dominated",
        5: "dominated_in_cohort",
        6: "not_dominated",
        7: "diverged",
    }
    by_id = {r["trial_id"]: r for r in records}
    assert (
        by_id[2]["dominated_by"] == 0
        and by_id[5]["dominated_by"] == 4
        and "not clearly above chance" in by_id[3]["reason"]
    )


def test_exploration_keeps_a_slow_starter_whose_gap_is_inside_the_noise():
    """The issue's MNIST-1D case: 0.279 vs 0.299 after a quarter epoch on 800 examples is noise."""
    se = lambda p: math.sqrt(p * (1 - p) / 800)
    slow, fast = (
        sm2_cand(0, 0.279, 1.0, se=se(0.279), start=0.1, chance=0.1),
        sm2_cand(1, 0.299, 1.0, se=se(0.299), start=0.1, chance=0.1),
    )
    assert exploration_filter([slow, fast], z=2.0)[0] == [0, 1]


def test_exploration_drops_a_configuration_that_has_not_learned_from_its_own_start():
    stuck = sm2_cand(0, 0.31, 1.0, start=0.30, chance=0.1, se=0.02)  # far above chance, but no better than its start
    learner = sm2_cand(1, 0.45, 1.0, start=0.30, chance=0.1, se=0.02)  # its family learned: no slow-starter pass
    kept, records = exploration_filter([stuck, learner], z=2.0)
    assert kept == [1] and records[0]["reason_code"] == "not_learned" and "before exploration" in records[0]["reason"]


def test_exploration_too_short_to_learn_drops_nothing_for_it():
    candidates = [sm2_cand(i, 0.1 + 0.001 * i, 1.0, cohort=f"c{i}", start=0.1, chance=0.1) for i in range(3)]
    kept, records = exploration_filter(candidates, z=2.0)
    assert kept == [0, 1, 2] and {r["reason_code"] for r in records} == {"nothing_learned"}


def test_a_much_better_configuration_is_never_dropped_for_a_small_energy_saving():
    better = sm2_cand(0, 0.95, 1.05, cohort="a")
    cheaper = [sm2_cand(i, 0.80, 1.0, cohort=f"b{i}") for i in range(1, 6)]  # 5% cheaper: inside the noise
    kept, _ = halve([better, *cheaper], sm2_objective(1.0), eta=3)
    assert kept[0] == 0
    kept, _ = halve([better, *cheaper], sm2_objective(1.0), eta=7)  # final rung: one kept
    assert kept == [0]
    # Even a much cheaper configuration never outranks a clearly better one.
    kept, _ = halve([better, sm2_cand(9, 0.80, 0.01, cohort="tiny")], sm2_objective(1.0), eta=3)
    assert kept == [0]
    # Exploration never drops on energy: the best of each cohort goes on, whatever it costs.
    assert exploration_filter(
        [better, sm2_cand(9, 0.80, 0.01, cohort="tiny"), sm2_cand(10, 0.97, 100.0, cohort="huge")], z=2.0
    )[0] == [0, 9, 10]


def test_ties_within_the_score_noise_go_to_the_clearly_cheaper_configuration():
    dear = sm2_cand(0, 0.960, 10.0, cohort="big", se=0.01)
    cheap = sm2_cand(1, 0.955, 1.0, cohort="small", se=0.01)  # tied: 0.005 < 1.4 standard errors
    worse = sm2_cand(2, 0.900, 0.1, cohort="tiny", se=0.01)  # cheapest, but clearly worse
    ranked = rank([dear, cheap, worse], sm2_objective(1.0))
    assert [c.trial_id for c, _ in ranked] == [1, 0, 2]
    terms = {c.trial_id: t for c, t in ranked}
    assert terms[1]["tier"] == terms[0]["tier"] == 1 and terms[2]["tier"] == 2 and terms[1]["cheaper_than"] == 1
    _, records = halve([dear, cheap, worse], sm2_objective(1.0), eta=4)  # final rung
    by_id = {r["trial_id"]: r for r in records}
    assert [r["trial_id"] for r in records if r["kept"]] == [1] and "tied with 0.96" in by_id[1]["reason"]
    # Energies within the noise do not reorder a tier: the better score stays first.
    close = sm2_cand(3, 0.955, 9.0, cohort="big2", se=0.01)
    assert [c.trial_id for c, _ in rank([dear, close], sm2_objective(1.0))] == [0, 3]


def test_without_energy_the_sm2_rule_is_successive_halving():
    candidates = [cand(i, s, energy=None, se=0.01) for i, s in enumerate([0.5, 0.9, 0.7, 0.89])]
    ranked = rank(candidates, sm2_objective(1.0))
    assert [c.trial_id for c, _ in ranked] == [1, 3, 2, 0]
    assert "energy unavailable" in ranked[0][1]["why"]
    assert exploration_filter([cand(0, 0.9, energy=None, cohort="a"), cand(1, 0.1, energy=None, cohort="b")])[0] == [
        0,
        1,
    ]


RECORDED = json.loads((pathlib.Path(__file__).parent / "data" / "digits_sm2_decisions.json").read_text())


def _decide(phase, candidates):
    if phase == "explore":
        return exploration_filter(candidates, z=2.0)[0]
    return halve(candidates, sm2_objective(1.0, 2.0), eta=3)[0]


@pytest.mark.parametrize("phase", ["explore", "rung-1", "rung-2"])
def test_recorded_decisions_replay_and_survive_energy_perturbations_inside_the_noise(phase):
    """Candidates recorded by a real digits study (9 cohorts, estimated energy): replayed, they get
    the recorded decisions; with every cohort's energy rate moved by up to half its stated noise, too."""
    records = RECORDED[phase]
    recorded_kept = sorted(r["trial_id"] for r in records if r["kept"])
    assert sorted(_decide(phase, [Candidate.from_terms(r) for r in records])) == recorded_kept
    rng = random.Random(0)
    for _ in range(50):
        factor = {r["cohort"]: 1 + rng.uniform(-0.5, 0.5) * r["energy_noise"] for r in records}
        perturbed = [
            Candidate.from_terms({**r, "joules_per_sample": r["joules_per_sample"] * factor[r["cohort"]]})
            for r in records
        ]
        assert sorted(_decide(phase, perturbed)) == recorded_kept


def test_energies_inside_the_noise_never_reorder_scores():
    """Two cohorts whose rates differ by less than the noise are tied on energy whatever the
    perturbation: the better score goes first, both ways round."""
    rng = random.Random(1)
    for _ in range(100):
        ra, rb = 1.0 * (1 + rng.uniform(-0.1, 0.1)), 1.15 * (1 + rng.uniform(-0.1, 0.1))
        a, b = sm2_cand(0, 0.950, ra, cohort="a", se=0.01), sm2_cand(1, 0.955, rb, cohort="b", se=0.01)
        ranked = rank([a, b], sm2_objective(1.0, 2.0))
        assert [c.trial_id for c, _ in ranked] == [1, 0] and ranked[0][1]["dearer_than"] == 0


def test_finalists_show_the_score_energy_trade_off():
    front = finalist_front(
        [
            sm2_cand(0, 0.96, 10.0, total=100, spent=100),
            sm2_cand(1, 0.95, 1.0, total=100, spent=100),
            sm2_cand(2, 0.90, 5.0, total=100, spent=100),
            sm2_cand(3, 0.99, 1.0, diverged=True),
        ]
    )
    assert [(f["trial_id"], f["pareto"]) for f in front] == [(0, True), (1, True), (2, False)]
    assert front[0]["projected_train_joules"] == pytest.approx(1000.0)  # nothing remains: rate x full budget


def test_blend_objective_weighs_performance_energy_and_progress():
    objective = blend_objective(alpha=0.5, beta=0.3)
    a = cand(0, 0.9, energy=100.0, gain=0.10)  # best score, dearest
    b = cand(1, 0.8, energy=10.0, gain=0.30)  # cheaper, learns faster per joule
    terms = objective([a, b])
    assert terms[0]["P_hat"] == 1.0 and terms[1]["P_hat"] == 0.0
    assert terms[0]["E_hat"] == 1.0 and terms[1]["E_hat"] == 0.0
    assert terms[1]["G_hat"] == 1.0
    assert terms[0]["objective"] == pytest.approx(0.5) and terms[1]["objective"] == pytest.approx(0.5)
    assert rank([a, b], objective)[0][0].trial_id == 0  # tie broken by trial id
    assert rank([a, b], blend_objective(alpha=0.3, beta=0.5))[0][0].trial_id == 1  # energy-heavier blend
    with pytest.raises(ValueError):
        blend_objective(alpha=0.8, beta=0.3)
    assert resolve_objective("blend", alpha=0.3, beta=0.5)([a, b])[1]["objective"] > 0.5


def test_float_noise_in_equal_energy_shares_is_not_amplified():
    e = 1.0 / 3.0
    noisy = [e, e, e + 2 * math.ulp(e)]  # the last share of a window absorbs rounding
    assert normalise(noisy) == [0.5, 0.5, 0.5]
    objective = blend_objective()
    ranked = rank([cand(i, s, energy=en) for i, (s, en) in enumerate(zip([0.5, 0.7, 0.6], noisy))], objective)
    assert [c.trial_id for c, _ in ranked] == [1, 2, 0]  # by score alone


def test_energy_unavailable_falls_back_to_performance():
    terms = blend_objective()([cand(0, 0.5, energy=None), cand(1, 0.7, energy=None)])
    assert [t["objective"] for t in terms] == [0.0, 1.0] and "unavailable" in terms[0]["note"]


def test_pareto_objective_orders_fronts():
    candidates = [
        cand(0, 0.9, energy=100.0),
        cand(1, 0.5, energy=10.0),
        cand(2, 0.4, energy=200.0),
        cand(3, 0.7, energy=50.0),
    ]
    terms = pareto_objective(candidates)
    assert [t["front"] for t in terms] == [0, 0, 1, 0]
    ranked = [c.trial_id for c, _ in rank(candidates, pareto_objective)]
    assert ranked[-1] == 2 and set(ranked[:2]) == {0, 1}  # extremes of the front first (infinite crowding)


def test_user_callable_objective():
    def cheapest(candidates):
        return [{"objective": -c.energy_spent} for c in candidates]

    objective = resolve_objective(cheapest)
    kept, _records = halve([cand(0, 0.9, energy=5.0), cand(1, 0.1, energy=1.0)], objective, eta=2)
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
    assert {r["reason_code"] for r in explored} <= {
        "not_dominated",
        "dominated",
        "dominated_in_cohort",
        "not_learned",
        "nothing_learned",
        "diverged",
        "score_not_finite",
    }
    assert explored[2]["reason_code"] == "diverged"


def test_a_family_where_nothing_learned_yet_keeps_its_best_to_the_first_rung():
    """Slow starters: a recurrent cohort sits at chance after a quarter epoch while an MLP cohort
    learned; the recurrent family's best (lowest validation loss) goes on, its others do not."""
    mlp = [sm2_cand(i, 0.60 - 0.01 * i, 1.0, cohort="mlp", chance=0.1, se=0.015) for i in range(3)]
    gru = [
        sm2_cand(10, 0.11, 2.0, cohort="gru", chance=0.1, se=0.01, val_loss=2.29),
        sm2_cand(11, 0.12, 2.0, cohort="gru", chance=0.1, se=0.01, val_loss=2.21),  # loss falls first
        sm2_cand(12, 0.10, 2.0, cohort="gru", chance=0.1, se=0.01, val_loss=2.30),
    ]
    kept, records = exploration_filter(mlp + gru, z=2.0)
    assert kept == [0, 1, 2, 11]
    why = {r["trial_id"]: r["reason_code"] for r in records}
    assert why[11] == "slow_starter" and why[10] == why[12] == "not_learned"
    # Without validation losses the score ranks the family.
    bare = [dataclasses.replace(c, val_loss=None) for c in gru]
    assert exploration_filter(mlp + bare, z=2.0)[0] == [0, 1, 2, 11]


def test_seed_noise_is_the_replicate_spread_beyond_sampling_noise():
    assert seed_noise([(0.5, 0.5, 0.01, 0.01)]) is None  # one pair: too few to estimate
    pairs = [(0.50, 0.46, 0.01, 0.01), (0.60, 0.64, 0.01, 0.01)]
    # (0.04^2 + 0.04^2) / 4 = 8e-4 observed, minus (4 * 0.01^2) / 4 = 1e-4 explained by sampling
    assert seed_noise(pairs) == pytest.approx(math.sqrt(8e-4 - 1e-4))
    assert seed_noise([(0.5, 0.51, 0.02, 0.02), (0.6, 0.6, 0.02, 0.02)]) == 0.0  # within sampling noise
    assert seed_noise([(0.5, math.nan, 0.01, 0.01), (0.6, 0.6, 0.0, 0.0), (0.7, 0.7, 0.0, 0.0)]) == 0.0


def test_measured_seed_noise_keeps_a_configuration_inside_it():
    """The issue's case: exploration dropped, at a gap of 0.049 against a 0.044 threshold of
    sampling noise alone, the configuration that won under SH by 4 points."""
    best = sm2_cand(0, 0.549, 1.0, chance=0.1, se=0.0156)
    winner_later = sm2_cand(1, 0.500, 1.0, chance=0.1, se=0.0156)
    kept, records = exploration_filter([best, winner_later], z=2.0)
    assert 2.0 * math.hypot(0.0156, 0.0156) == pytest.approx(0.044, abs=1e-3)  # sampling noise only
    assert kept == [0] and records[1]["reason_code"] == "dominated_in_cohort"  # gap 0.049 > 0.044
    for c in (best, winner_later):
        c.seed_se = 0.02  # measured by replicates: initialisation and data order move a score this much
    kept, records = exploration_filter([best, winner_later], z=2.0)
    assert kept == [0, 1] and records[1]["seed_se"] == 0.02  # margin 2 * sqrt(2 * (0.0156^2 + 0.02^2)) = 0.072


def test_exploration_halves_each_cohort_by_rank_and_never_across_cohorts():
    """Six learning rates of one model explore to scores within the seed noise: the clear-margin test
    keeps all six, the halving the best three. A second, slower model keeps its own best half even
    though every one of its scores is below the first model's worst."""
    fast = [sm2_cand(i, 0.30 - 0.005 * i, 2.0, cohort="big", chance=0.1, se=0.016) for i in range(6)]
    for c in fast:
        c.seed_se = 0.02
    slow = [sm2_cand(10 + i, 0.20 - 0.01 * i, 0.1, cohort="small", chance=0.1, se=0.014) for i in range(4)]
    kept_all, _ = exploration_filter(fast + slow, z=2.0)
    assert kept_all == [0, 1, 2, 3, 4, 5, 10, 11, 12, 13]  # nothing is clearly worse than its cohort's best
    kept, records = exploration_filter(fast + slow, z=2.0, keep=0.5)
    assert kept == [0, 1, 2, 10, 11]
    why = {r["trial_id"]: r for r in records}
    assert [why[t]["reason_code"] for t in (3, 4, 5, 12, 13)] == ["outside_cohort_half"] * 5
    assert "rank 4 of its cohort's 6" in why[3]["reason"] and "best 3 of 6" in why[3]["reason"]
    # The halving counts the whole cohort (ceil(keep * k)), also what the clear-margin test dropped,
    # and a cohort of one keeps its one.
    spread = [sm2_cand(i, s, 1.0, cohort="c", chance=0.1, se=0.01) for i, s in enumerate([0.9, 0.88, 0.3, 0.2])]
    alone = [sm2_cand(20, 0.5, 1.0, cohort="d", chance=0.1, se=0.01)]
    kept, records = exploration_filter(spread + alone, z=2.0, keep=0.5)
    assert kept == [0, 1, 20]
    assert [r["reason_code"] for r in records[2:4]] == ["dominated_in_cohort"] * 2
    # Rank ties break by the validation loss, then the trial id; keep must be a fraction.
    tied = [sm2_cand(i, 0.5, 1.0, chance=0.1, se=0.01, val_loss=loss) for i, loss in enumerate([1.2, 1.1, 1.3, 1.0])]
    assert exploration_filter(tied, z=2.0, keep=0.5)[0] == [1, 3]
    with pytest.raises(ValueError, match="keep must be in"):
        exploration_filter(tied, keep=0.0)
