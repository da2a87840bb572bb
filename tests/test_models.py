"""Every model trains in a cohort on small generated data of its task's shape."""

import jax
import numpy as np
import pytest

from sm2jax.cohort import group_into_cohorts
from sm2jax.data import ArrayDataset
from sm2jax.models import build_model
from sm2jax.space import Categorical, SearchSpace


def _dataset(task, rng):
    if task == "image":
        x = rng.random((64, 8, 8, 3), dtype=np.float32)
        y = rng.integers(0, 10, 64).astype(np.int32)
        return ArrayDataset("tiny-images", "classification", x[:48], y[:48], x[48:], y[48:], 10)
    if task == "series":
        x = rng.standard_normal((64, 12, 7)).astype(np.float32)
        y = x[:, -1, :1] * 0.5
        return ArrayDataset("tiny-series", "regression", x[:48], y[:48], x[48:], y[48:], 1)
    if task == "sequence":  # MNIST-1D-shaped: 40 steps of 1 channel, 10 classes
        x = rng.standard_normal((64, 40, 1)).astype(np.float32)
        y = rng.integers(0, 10, 64).astype(np.int32)
        return ArrayDataset("tiny-sequences", "classification", x[:48], y[:48], x[48:], y[48:], 10)
    tokens = rng.integers(0, 32, (64, 17)).astype(np.int32)
    return ArrayDataset(
        "tiny-text", "language_model", tokens[:48, :-1], tokens[:48, 1:], tokens[48:, :-1], tokens[48:, 1:], 32
    )


@pytest.mark.parametrize(
    "model, task",
    [
        ({"name": "mlp", "hidden": [16, 16]}, "image"),
        ({"name": "cnn", "channels": [4, 8]}, "image"),
        ({"name": "resnet18", "width": 4}, "image"),
        ({"name": "lstm", "hidden": 8}, "series"),
        ({"name": "cnn1d", "channels": [4, 8], "kernel": 5}, "sequence"),
        ({"name": "gru", "hidden": 8}, "sequence"),
        ({"name": "transformer", "dim": 16, "depth": 1, "heads": 2}, "text"),
    ],
)
@pytest.mark.slow
def test_model_trains_in_a_cohort(model, task):
    from sm2jax.execute.trainer import CohortTrainer

    ds = _dataset(task, np.random.default_rng(0))
    configs = SearchSpace(
        {"model": model, "learning_rate": Categorical([1e-3, 1e-2]), "batch_size": 8, "dropout": 0.1}
    ).grid()
    (cohort,) = group_into_cohorts(configs)
    trainer = CohortTrainer(cohort, ds, schedule_steps=10)
    (state,) = trainer.init()
    before = trainer.evaluate(state)
    state, metrics = trainer.train(state, 6)
    after = trainer.evaluate(state)
    assert np.isfinite(np.asarray(metrics.loss_mean)).all()
    assert np.asarray(state.active).all()
    assert not np.allclose(np.asarray(before.loss), np.asarray(after.loss))  # it learned something
    if model["name"] == "resnet18":  # batch statistics are per trial and get updated
        stats = jax.tree.leaves(state.model_state)
        assert stats and all(leaf.shape[0] == 2 for leaf in stats)
        assert not np.allclose(stats[0][0], stats[0][1])


@pytest.mark.slow
def test_resnet18_has_the_cifar_layout():
    model = build_model({"name": "resnet18", "width": 4}, (32, 32, 3), 10, key=jax.random.PRNGKey(0))
    assert len(model.blocks) == 8  # 4 stages x 2 basic blocks
    assert model.stem.kernel_size == (3, 3)
    out = model(np.zeros((2, 32, 32, 3), np.float32))
    assert out.shape == (2, 10)


@pytest.mark.slow
def test_bfloat16_cohort_computes_in_bf16_and_keeps_float32_parameters(digits):
    from sm2jax.execute.trainer import CohortTrainer

    (cohort,) = group_into_cohorts(
        SearchSpace(
            {"learning_rate": Categorical([1e-2]), "dtype": "bfloat16", "model": {"name": "cnn", "channels": [8, 16]}}
        ).grid()
    )
    trainer = CohortTrainer(cohort, digits, schedule_steps=100)
    state, _metrics = trainer.train(trainer.init()[0], 100)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state.params))
    model = build_model(
        cohort.signature.model_spec, digits.input_shape, 10, dtype="bfloat16", key=jax.random.PRNGKey(0)
    )
    assert model(digits.x_train[:2]).dtype == np.dtype("bfloat16")
    assert float(trainer.evaluate(state).metric[0]) > 0.6
