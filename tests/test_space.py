import math

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
