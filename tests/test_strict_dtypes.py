"""Our own numerical helpers are clean under strict dtype promotion."""

import jax
import jax.numpy as jnp
import pytest

from sm2jax.cohort import unit_schedule
from sm2jax.execute.batches import batch_indices
from sm2jax.execute.steps import task_loss
from sm2jax.tasks import get_task


@pytest.mark.slow
def test_helpers_under_strict_promotion():
    with jax.numpy_dtype_promotion("strict"):
        assert unit_schedule(jnp.int32(3), jnp.float32(0.1), jnp.float32(1.0), jnp.float32(50)).dtype == jnp.float32
        idx = batch_indices(jax.random.PRNGKey(0), jnp.int32(7), 100, 16)
        assert idx.shape == (16,)
        loss, acc = task_loss(get_task("classification"), jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32))
        assert loss.dtype == acc.dtype == jnp.float32
        mse, _ = task_loss(get_task("regression"), jnp.zeros((4, 1)), jnp.ones((4, 1)))
        assert float(mse.mean()) == pytest.approx(1.0)
        lm, _ = task_loss(get_task("language_model"), jnp.zeros((2, 5, 7)), jnp.zeros((2, 5), jnp.int32))
        assert lm.shape == (2,)
