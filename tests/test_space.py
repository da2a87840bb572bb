import math

import numpy as np
import pytest

from sm2jax.space import Categorical, Fixed, IntUniform, LogUniform, SearchSpace, Uniform, make_config


def test_grid_is_the_product_with_stable_ids():
    space = SearchSpace({"learning_rate": LogUniform(1e-3, 1e-1, num=3), "batch_size": Categorical([16, 64])})
    grid = space.grid()
    assert [c.trial_id for c in grid] == list(range(6))
    assert sorted({c["learning_rate"] for c in grid}) == pytest.approx([1e-3, 1e-2, 1e-1])
    assert {c["batch_size"] for c in grid} == {16, 64}
    # Defaults fill everything not in the space.
    assert grid[0]["optimizer"] == "adam" and math.isinf(grid[0]["max_grad_norm"])
    # Same space, same ids and keys.
    again = SearchSpace({"learning_rate": LogUniform(1e-3, 1e-1, num=3), "batch_size": Categorical([16, 64])})
    assert [c.key for c in again.grid()] == [c.key for c in grid]


def test_random_sampling_is_seeded_and_in_bounds():
    space = SearchSpace({"learning_rate": LogUniform(1e-4, 1e-1), "b1": Uniform(0.8, 0.95), "seed": IntUniform(0, 5)})
    a, b, c = space.sample(20, seed=1), space.sample(20, seed=1), space.sample(20, seed=2)
    assert [x.values for x in a] == [x.values for x in b]
    assert [x.values for x in a] != [x.values for x in c]
    assert all(1e-4 <= x["learning_rate"] <= 1e-1 and 0.8 <= x["b1"] <= 0.95 and 0 <= x["seed"] <= 5 for x in a)


def test_json_round_trip():
    space = SearchSpace(
        {"learning_rate": LogUniform(1e-3, 1e-1, num=2), "schedule": Categorical(["cosine", "linear"]), "batch_size": 8}
    )
    again = SearchSpace.from_json(space.to_json())
    assert [c.values for c in again.grid()] == [c.values for c in space.grid()]
    config = space.grid()[0]
    assert type(config).from_json(config.to_json()) == config


@pytest.mark.parametrize(
    "domains, field",
    [
        ({"learning_rate": LogUniform(-1e-3, 1e-1)}, "learning_rate"),
        ({"learning_rate": Fixed(-0.1)}, "learning_rate"),
        ({"optimizer": Categorical(["adam", "adagrad-ish"])}, "optimizer"),
        ({"batch_size": Categorical([])}, "batch_size"),
        ({"b1": Uniform(0.99, 0.9)}, "b1"),
        ({"lerning_rate": 0.1}, "lerning_rate"),
        ({"model": "vgg"}, "model"),
        ({"schedule": "exponential"}, "schedule"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_invalid_spaces_name_the_field(domains, field):
    with pytest.raises(ValueError, match=repr(field)):
        SearchSpace(domains)


def test_empty_space_is_rejected():
    with pytest.raises(ValueError, match="empty search space"):
        SearchSpace({})


def test_make_config_validates():
    with pytest.raises(ValueError, match="'warmup_fraction'"):
        make_config(0, warmup_fraction=1.5)


def test_every_searcher_maps_a_domain_the_same_way():
    """One mapping from [0, 1) to a domain's values (``value_at``): random draws go through it (bit
    for bit numpy's uniform draws for the continuous domains, so a random study's draws are what
    they were), and random and Sobol' draws of a log-scaled integer have the same distribution,
    each integer k with probability log((k + 1) / k) / log((high + 1) / low)."""
    from sm2jax.sampling import from_unit, unit_points

    for domain in (Uniform(-2.0, 3.0), LogUniform(1e-4, 3e-1)):
        new, old = np.random.default_rng(7), np.random.default_rng(7)
        draws = [domain.sample(new) for _ in range(200)]
        log = isinstance(domain, LogUniform)
        before = [
            float(np.exp(old.uniform(np.log(domain.low), np.log(domain.high))))
            if log
            else float(old.uniform(domain.low, domain.high))
            for _ in range(200)
        ]
        assert draws == before  # the same floats, not merely close
    ints = IntUniform(1, 16, log=True)
    n = 4096
    exact = np.array([math.log((k + 1) / k) / math.log(17) for k in range(1, 17)])
    random = np.bincount([ints.sample(np.random.default_rng(s)) for s in range(n)], minlength=17)[1:] / n
    sobol = np.bincount([from_unit(ints, u) for u in unit_points("sobol", n, 1, seed=0)[:, 0]], minlength=17)[1:] / n
    assert np.abs(random - exact).max() < 0.02 and np.abs(sobol - exact).max() < 0.005
    assert ints.value_at(0.0) == 1 and ints.value_at(np.nextafter(1.0, 0.0)) == 16


def test_a_study_from_before_proposals_were_kept_resumes_on_what_it_drew(tmp_path):
    """A random study with a log-scaled integer, run before proposals.json was kept, drew that integer
    as round(exp(U(log low, log high))): resumed, it takes those draws back (once: then they are
    kept), although a new study of the same spec draws through the one mapping."""
    from conftest import quick_spec

    from sm2jax.proposals import study_proposals
    from sm2jax.store.folder import StudyDir

    space = {"batch_size": IntUniform(8, 256, log=True), "learning_rate": LogUniform(1e-3, 1e-1)}
    spec = quick_spec(space, sampler="random", num_samples=12, seed=3)
    folder = StudyDir(tmp_path / "old")
    fresh, kept = study_proposals(folder, spec)
    assert not kept
    folder.claim(spec.to_json())
    (tmp_path / "old" / "ledger.jsonl").write_text("{}\n")  # it has run, and kept no proposals
    resumed, kept = study_proposals(folder, spec)
    assert not kept  # (the study writes them now)
    rng = np.random.default_rng(3)
    drawn_then = []
    for _ in range(12):
        bs = round(np.exp(rng.uniform(np.log(8), np.log(256))))
        drawn_then.append((bs, float(np.exp(rng.uniform(np.log(1e-3), np.log(1e-1))))))
    assert [(c["batch_size"], c["learning_rate"]) for c in resumed.first] == drawn_then
    assert [c["batch_size"] for c in fresh.first] != [bs for bs, _ in drawn_then]  # the mapping did change
