"""A search that learns and grows: rounds of proposals, the TPE searcher batched per cohort,
``extend`` and a warm start. The searcher's and the selection's claims are tested on constructed
results; the study's (kept proposals, a kill in round 2, growth, compiles) on real studies."""

import collections
import json
import math
import os

import numpy as np
import pytest
from conftest import quick_spec
from kill import kill_mid_phase

from sm2jax import Study
from sm2jax.cli import main
from sm2jax.compile_cache import count_compiles
from sm2jax.energy.ledger import read_ledger
from sm2jax.handback import load_selected
from sm2jax.phases import DecisionRules, StudyState
from sm2jax.proposals import first_proposals
from sm2jax.report import format_results
from sm2jax.rounds import Proposals, parse_label, phase_order, round_sizes, schedule, select_across_rounds
from sm2jax.search import Observation, SearchContext, get_searcher
from sm2jax.search.tpe import allocate_blocks, fitting_budget, model_values
from sm2jax.space import Categorical, LogUniform, SearchSpace

SPACE = SearchSpace(
    {
        "learning_rate": LogUniform(1e-4, 1.0),
        "weight_decay": LogUniform(1e-5, 1e-1),
        "optimizer": Categorical(["sgd", "adam"]),
        "batch_size": Categorical([32, 128]),
    }
)


def _known_optimum(values) -> float:
    """A score with one optimum: learning rate 1e-2, weight decay 1e-3, adam, batch size 32."""
    score = -abs(math.log10(values["learning_rate"]) + 2.0) - 0.5 * abs(math.log10(values["weight_decay"]) + 3.0)
    return score - (0.7 if values["optimizer"] != "adam" else 0.0) - (0.3 if values["batch_size"] != 32 else 0.0)


def _history(n: int, budget: float = 1.0) -> list[Observation]:
    configs = get_searcher("sobol").propose(SPACE, n, seed=0)[:n]
    return [Observation(c.trial_id, dict(c.values), budget, _known_optimum(c.values), score_se=0.01) for c in configs]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tpe_concentrates_its_next_round_near_a_known_optimum_and_sobol_does_not(seed):
    best_decile = np.quantile([_known_optimum(c.values) for c in SPACE.sample(20_000, seed=1)], 0.9)
    history = _history(48)
    tpe = get_searcher("tpe").propose(SPACE, 32, seed=seed, first_id=48, history=history, context=SearchContext())
    sobol = get_searcher("sobol").propose(SPACE, 32, seed=seed + 10, first_id=48, history=history)
    near = lambda configs: np.mean([_known_optimum(c.values) >= best_decile for c in configs])
    assert near(tpe) > 0.5, near(tpe)
    assert near(sobol) < 0.25, near(sobol)
    assert [c.trial_id for c in tpe] == list(range(48, 80))


def test_tpe_proposes_whole_cohorts_and_prefers_a_compiled_one_it_rates_as_well():
    configs = get_searcher("tpe").propose(SPACE, 20, seed=3, history=_history(48), context=SearchContext())
    per_cohort = collections.Counter((c["optimizer"], c["batch_size"]) for c in configs)
    assert len(configs) == 24 and all(n % 8 == 0 for n in per_cohort.values()), per_cohort  # rounded up to fill
    proposed = ["a"] * 5 + ["b"] * 4 + ["c"] * 3  # the static part of 12 free proposals
    assert allocate_blocks(proposed, 1) == {"a": 1}
    assert allocate_blocks(proposed, 1, compiled={"b"}) == {"b": 1}  # 4 is within the noise of 5
    assert allocate_blocks(proposed, 1, compiled={"c"}) == {"a": 1}  # 3 is not: the model's choice
    assert allocate_blocks(proposed, 3) == {"a": 1, "b": 1, "c": 1}  # D'Hondt: 5, then 4, then 3 > 5/2
    assert allocate_blocks(proposed, 4) == {"a": 2, "b": 1, "c": 1}  # then 5/2 > 4/2
    assert allocate_blocks(["a"] * 9 + ["b"] * 2, 2, compiled={"b"}) == {"a": 2}


def test_tpe_fits_at_the_largest_budget_with_enough_observations_and_starts_like_sobol():
    many_low, few_high = _history(12, budget=1.0), _history(5, budget=3.0)
    assert fitting_budget(many_low + few_high, dims=4) == 1.0  # 5 < max(d + 1, 6) at budget 3
    assert fitting_budget(many_low + _history(7, budget=3.0), dims=4) == 3.0
    assert fitting_budget(few_high, dims=4) is None
    cold = get_searcher("tpe").propose(SPACE, 16, seed=4, history=few_high, context=SearchContext())
    assert [c.values for c in cold] == [c.values for c in get_searcher("sobol").propose(SPACE, 16, seed=4)]


def test_with_sm2s_objective_the_model_rates_twice_the_energy_as_final_z_standard_errors_less():
    obs = [
        Observation(0, {}, 1.0, 0.90, score_se=0.02, train_joules=10.0),
        Observation(1, {}, 1.0, 0.90, score_se=0.02, train_joules=20.0),
        Observation(2, {}, 1.0, 0.92, score_se=0.02, train_joules=40.0),
    ]
    assert model_values(obs, "performance", 0.5) == [0.90, 0.90, 0.92]
    sm2 = model_values(obs, "sm2", 0.5)
    assert sm2 == pytest.approx([0.90, 0.89, 0.90])  # 0.5 x 0.02 per doubling
    unknown = [obs[0], Observation(1, {}, 1.0, 0.8, score_se=0.02, train_joules=None)]
    assert model_values(unknown, "sm2", 0.5) == [0.90, 0.8]  # an energy unknown: the scores alone


def test_a_studys_schedule_runs_every_round_and_names_later_rounds_apart():
    spec = quick_spec(sampler="tpe", num_samples=20, rounds=3, extensions=[{"samples": 5, "rounds": 1}])
    assert round_sizes(spec) == [7, 7, 6, 5]
    steps = schedule(spec)
    assert [s.label for s in steps[:4]] == ["explore", "rung-1", "rung-2", "r2.explore"]
    assert [s.label for s in steps if s.round_end] == ["rung-2", "r2.rung-2", "r3.rung-2", "r4.rung-2"]
    assert parse_label("r3.rung-2") == (3, "rung-2") and parse_label("rung-2") == (1, "rung-2")
    labels = ["r2.rung-1", "rung-10", "compile", "r2.explore", "rung-2", "explore", "probe"]
    assert sorted(labels, key=phase_order) == [
        "compile",
        "probe",
        "explore",
        "rung-2",
        "rung-10",
        "r2.explore",
        "r2.rung-1",
    ]
    assert len(schedule(quick_spec())) == len(quick_spec().phases())  # one round: the study as before rounds


def test_the_selection_over_rounds_is_the_final_rungs_rule():
    state = StudyState()
    rates = {"a": 1.0, "b": 4.0}
    for t, (cohort, score) in enumerate([("a", 0.90), ("b", 0.93), ("a", 0.925)]):
        state.trials[str(t)] = {
            "score": score,
            "score_se": 0.01,
            "energy_spent": 100.0,
            "samples_spent": 100,
            "samples_total": 100,
            "cohort": cohort,
            "history": [{"phase": ["rung-2", "r2.rung-2", "r3.rung-2"][t]}],
        }
    state.cohort_energy = {k: [{"phase": "rung-2", "joules": r * 100, "samples": 100}] for k, r in rates.items()}
    state.rounds = [
        {"round": k + 1, "label": lab, "selected": k, "test": {"score": 0.5 + k}}
        for k, lab in enumerate(["rung-2", "r2.rung-2", "r3.rung-2"])
    ]
    rules = DecisionRules.of(quick_spec())
    select_across_rounds(state, rules, "rung-2")
    # 0.925 and 0.93 are within final_z (0.5) x sqrt(2) x 0.01: the cheaper cohort's configuration.
    assert state.selected == 2 and state.test == {"score": 2.5}
    assert [f["trial_id"] for f in state.finalists] == [1, 2, 0]
    state.trials["2"]["score"] = 0.90
    select_across_rounds(state, rules, "rung-2")
    assert state.selected == 1 and state.test == {"score": 1.5}  # clearly better: it wins at 4x the energy


def test_proposals_of_later_rounds_are_kept_beside_round_one():
    first = quick_spec().configs()
    kept = Proposals(first, {})
    later = get_searcher("sobol").propose(SPACE, 8, seed=1, first_id=len(first))
    kept.add(2, later, sampler="sobol", observations=12)
    back = Proposals.from_json(json.loads(json.dumps(kept.to_json())))
    assert [c.values for c in back.all()] == [c.values for c in first + later]
    assert back.round_of()[len(first)] == 2 and back.later[0]["observations"] == 12
    with pytest.raises(ValueError, match="round 4 proposed after round 2"):
        back.add(4, later)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rounds": 0}, "rounds must be >= 1"),
        ({"rounds": 3, "sampler": "grid"}, "cannot run in rounds"),
        ({"rounds": 5, "num_samples": 4, "sampler": "tpe"}, "each round proposes at least one"),
        ({"warm_start": "/nowhere", "sampler": "sobol"}, "learns nothing"),
        ({"rounds": 2, "sampler": "tpe", "max_energy_joules": 10.0}, "caps a study of one round"),
    ],
)
def test_bad_rounds_are_one_line(fields, message):
    with pytest.raises(ValueError, match=message) as err:
        quick_spec(**fields)
    assert "\n" not in str(err.value)


def test_bad_extensions_and_warm_starts_are_one_line_before_anything_is_written(tmp_path, capsys):
    assert main(["extend", str(tmp_path / "none"), "--samples", "4"]) == 2
    assert "no study in" in capsys.readouterr().err and not (tmp_path / "none").exists()
    assert main(["extend", str(tmp_path / "none"), "--samples", "0"]) == 2
    assert "--samples >= 1" in capsys.readouterr().err and not (tmp_path / "none").exists()
    spec = quick_spec(sampler="tpe", warm_start=str(tmp_path / "none"))
    with pytest.raises(ValueError, match="holds no study that has finished a phase"):
        Study(tmp_path / "warm", spec, progress=False)
    assert not (tmp_path / "warm").exists()


@pytest.mark.slow  # three studies
def test_extend_keeps_every_result_compiles_nothing_new_and_a_warm_start_learns_from_it(tmp_path):
    folder = tmp_path / "grown"
    spec = quick_spec(sampler="tpe", num_samples=8)
    first = Study(folder, spec, progress=False).run()
    ledger_before = read_ledger(folder / "ledger.jsonl")
    with count_compiles() as tally:
        grown = Study(folder, progress=False).extend(8)
    assert tally.requests == 0, tally.to_json()  # its proposals fall in the cohort round 1 compiled
    before = {t["trial_id"]: t for t in first["trials"]}
    after = {t["trial_id"]: t for t in grown["trials"]}
    assert len(after) == len(before) + 8
    for t, row in before.items():  # every earlier result and its energy, as they were
        assert {k: after[t][k] for k in ("score", "energy_joules", "samples")} == {
            k: row[k] for k in ("score", "energy_joules", "samples")
        }
    assert read_ledger(folder / "ledger.jsonl")[: len(ledger_before)] == ledger_before
    assert [r["round"] for r in grown["rounds"]] == [1, 2] and grown["rounds"][1]["observations"] > 0
    assert json.loads((folder / "spec.json").read_text())["extensions"] == [{"samples": 8, "rounds": 1}]
    assert "rounds: 2" in format_results(grown)
    assert collections.Counter(t["round"] for t in grown["trials"]) == {1: len(before), 2: 8}
    for r in grown["rounds"]:  # each round's selection loads from the checkpoint of its round
        assert load_selected(folder, r["selected"]).trial_id == r["selected"]
    assert grown["selected"]["trial_id"] in {r["selected"] for r in grown["rounds"]}

    # A warm start from it: its first round is proposed from those results, and none of them trains again.
    cold = quick_spec(sampler="tpe", num_samples=8)
    warm = quick_spec(sampler="tpe", num_samples=8, warm_start=str(folder))
    trained = {c["learning_rate"] for c in Study(folder, progress=False).configs.values()}
    warm_configs = first_proposals(warm)[0]
    assert [c.values for c in warm_configs] != [c.values for c in first_proposals(cold)[0]]
    assert not trained & {c["learning_rate"] for c in warm_configs}
    other = quick_spec(
        {"learning_rate": LogUniform(1e-3, 1e-1), "batch_size": 32}, warm_start=str(folder), sampler="tpe"
    )
    with pytest.raises(ValueError, match=r"searched another space .*differs in: batch_size, learning_rate"):
        Study(tmp_path / "other", other, progress=False)
    assert not (tmp_path / "other").exists()
    ran = Study(tmp_path / "warm", warm, progress=False).run()
    assert {t["config"]["learning_rate"] for t in ran["trials"]} == {c["learning_rate"] for c in warm_configs}


@pytest.mark.slow  # two studies and a kill
def test_kill_in_round_two_and_resume_reaches_the_same_proposals_decisions_and_selection(tmp_path):
    spec = quick_spec(sampler="tpe", num_samples=16, rounds=2, steps_per_window=2)
    reference = Study(tmp_path / "ref", spec, progress=False).run()
    killed = tmp_path / "killed"
    Study(killed, spec, progress=False)  # writes spec.json
    kill_mid_phase(killed, phase="r2.rung-1")
    assert os.path.exists(killed / "proposals.json")
    resumed = Study(killed, progress=False).run()
    assert resumed["attempts"] == 2
    assert (killed / "proposals.json").read_text() == (tmp_path / "ref" / "proposals.json").read_text()
    strip = lambda r: [{k: d[k] for k in ("phase", "trial_id", "kept", "reason_code")} for d in r["decisions"]]
    assert strip(resumed) == strip(reference)
    assert resumed["selected"]["trial_id"] == reference["selected"]["trial_id"]
    assert [r["selected"] for r in resumed["rounds"]] == [r["selected"] for r in reference["rounds"]]


@pytest.mark.slow  # a study, then its extension
def test_a_study_from_before_rounds_extends_and_keeps_its_first_rounds_finalists(tmp_path):
    folder = tmp_path / "old"
    spec = quick_spec(sampler="sobol", num_samples=8, max_budget=9)  # 4 phases a round: more than 3 are kept
    first = Study(folder, spec, progress=False).run()
    for name in os.listdir(folder / "progress"):  # as a study from before rounds were recorded
        path = folder / "progress" / name
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "rounds"}))
    grown = Study(folder, progress=False).extend(8)
    assert [r["round"] for r in grown["rounds"]] == [1, 2]
    assert grown["rounds"][0]["selected"] == first["selected"]["trial_id"]
    assert load_selected(folder, first["selected"]["trial_id"]).trial_id == first["selected"]["trial_id"]
