import jax.numpy as jnp
import numpy as np
import pytest

from sm2jax.cohort import Signature, group_into_cohorts, hyperparameter_arrays, traced_names, unit_schedule
from sm2jax.space import Categorical, LogUniform, SearchSpace
from sm2jax.vocabulary import COMMON_TRACED


def test_grouping_by_static_signature_keeps_order():
    space = SearchSpace(
        {
            "learning_rate": LogUniform(1e-3, 1e-2, num=2),
            "batch_size": Categorical([16, 32]),
            "optimizer": Categorical(["sgd", "adam"]),
        }
    )
    cohorts = group_into_cohorts(space.grid())
    assert len(cohorts) == 4
    assert all(c.size == 2 for c in cohorts)
    for c in cohorts:
        assert len({Signature.of(x) for x in c.configs}) == 1
        assert [x.trial_id for x in c.configs] == sorted(x.trial_id for x in c.configs)
    with pytest.raises(ValueError):
        group_into_cohorts([])


def test_cohort_names_are_unique_when_only_model_options_differ():
    models = [
        {"name": "mlp", "hidden": [32]},
        {"name": "mlp", "hidden": [256, 256]},
        {"name": "mlp", "hidden": [1024, 1024]},
    ]
    space = SearchSpace(
        {"model": Categorical(models), "batch_size": 16, "learning_rate": LogUniform(1e-3, 1e-2, num=2)}
    )
    cohorts = group_into_cohorts(space.grid())
    names = [c.name for c in cohorts]
    assert len(cohorts) == 3 and len(set(names)) == 3
    assert all(n.startswith("mlp-bs16-adam") for n in names)  # readable, then a hash of the signature
    assert names == [c.name for c in group_into_cohorts(space.grid())]  # stable across calls (resume)


def test_hyperparameter_arrays_have_a_trial_axis():
    configs = SearchSpace({"learning_rate": LogUniform(1e-3, 1e-1, num=3), "schedule": "cosine"}).grid()
    names = traced_names(group_into_cohorts(configs)[0].signature)
    assert set(names) == {
        "learning_rate",
        "weight_decay",
        "momentum",
        "b1",
        "b2",
        *COMMON_TRACED,
    }  # the layout checkpoints have
    arrays = hyperparameter_arrays(configs, schedule_steps=100, names=names)
    assert arrays["learning_rate"].shape == (3,) and arrays["learning_rate"].dtype == np.float32
    np.testing.assert_allclose(arrays["learning_rate"], [1e-3, 1e-2, 1e-1], rtol=1e-6)
    np.testing.assert_array_equal(arrays["schedule_id"], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(arrays["schedule_steps"], [100.0] * 3)


@pytest.mark.parametrize(
    "schedule_id, warmup, t, expected",
    [
        (0.0, 0.0, 50, 1.0),  # constant
        (1.0, 0.0, 0, 1.0),  # cosine at the start
        (1.0, 0.0, 50, 0.5),  # cosine half way
        (1.0, 0.0, 100, 0.0),  # cosine at the end
        (2.0, 0.0, 25, 0.75),  # linear
        (0.0, 0.1, 4, 0.4),  # warm-up over 10 steps: 4 / 10 (optax starts its warm-up at 0)
        (2.0, 0.1, 55, 0.5),  # linear decay after 10 warm-up steps: 1 - 45/90
    ],
)
def test_unit_schedule(schedule_id, warmup, t, expected):
    value = unit_schedule(jnp.int32(t), jnp.float32(warmup), jnp.float32(schedule_id), jnp.float32(100))
    assert float(value) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("warmup_steps, total", [(3, 10), (10, 100), (1, 5)])
def test_warmup_cosine_matches_optax_step_for_step(warmup_steps, total):
    import optax

    reference = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps, total, 0.0)
    for t in range(total + 2):
        ours = unit_schedule(jnp.int32(t), jnp.float32(warmup_steps / total), jnp.float32(1.0), jnp.float32(total))
        assert float(ours) == pytest.approx(float(reference(t)), abs=1e-6), t


def test_clip_by_global_norm_matches_optax_and_is_per_trial():
    import jax
    import optax

    from sm2jax.cohort import clip_by_global_norm

    grads = {"w": jnp.asarray([[3.0, -4.0], [1.0, 2.0]]), "b": jnp.asarray([12.0, 0.5])}
    for max_norm in (0.5, 5.0, 13.2, jnp.inf):
        ours, _ = clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
        ref, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-6)
    unclipped, _ = clip_by_global_norm(jnp.inf).update(grads, optax.EmptyState())
    for a, b in zip(jax.tree.leaves(unclipped), jax.tree.leaves(grads)):
        np.testing.assert_array_equal(a, b)  # a factor of exactly 1
    # Inside vmap each trial is clipped by its own norm and its own threshold.
    stacked = jax.tree.map(lambda g: jnp.stack([g, 10 * g]), grads)
    out = jax.vmap(lambda g, c: clip_by_global_norm(c).update(g, optax.EmptyState())[0])(
        stacked, jnp.asarray([100.0, 1.0])
    )
    np.testing.assert_array_equal(out["w"][0], grads["w"])
    np.testing.assert_allclose(float(optax.tree.norm(jax.tree.map(lambda a: a[1], out))), 1.0, rtol=1e-6)
