"""Strict numerics for the whole suite: no silent rank promotion.

Dtype promotion stays "standard" globally because optax's own bias correction raises a traced
``b1`` (float32) to an int32 count, which strict mode rejects; our own numerical helpers are checked
under ``jax.numpy_dtype_promotion("strict")`` in ``test_strict_dtypes.py``.
"""

import os

# In-process tests run on one device (their widths and program counts are for one device), on a
# CPU-only machine or one with several GPUs alike; multi-device behaviour is tested in subprocesses
# with CPU devices (test_scale_out.py).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")

import jax
import pytest

from sm2jax.compile_cache import enable_compile_cache

jax.config.update("jax_numpy_rank_promotion", "raise")
# The persistent compilation cache (at its per-user default, or SM2JAX_COMPILE_CACHE): a second run
# of the suite loads its programs instead of compiling them. Tests that count compiles run in
# subprocesses with their own cache directory.
enable_compile_cache()


@pytest.fixture(scope="session")
def digits():
    from sm2jax.data import load_digits

    return load_digits()


QUICK_STUDY = dict(
    dataset="digits",
    explore_budget=0.25,
    min_budget=1,
    max_budget=3,
    eta=3,
    idle_seconds=0.0,
    probe_width=False,
    energy_method="estimated",
)
"""The quick study most tests run: digits, exploration then rungs at 1 and 3 epochs, no idle
baseline, no width probe, energy estimated (deterministic enough to assert on, cheap to run)."""


def quick_spec(space=None, **overrides):
    """The tests' one spec factory: :data:`QUICK_STUDY` over ``space`` (a :class:`SearchSpace`, its
    JSON, or a mapping of domains; default: two learning rates at batch size 64), with ``overrides``
    (``from conftest import quick_spec``)."""
    from sm2jax.space import LogUniform, SearchSpace
    from sm2jax.spec import StudySpec

    if space is None:
        space = {"learning_rate": LogUniform(3e-3, 3e-2, num=2), "batch_size": 64}
    if isinstance(space, SearchSpace):
        space = space.to_json()
    elif any(not isinstance(v, dict) for v in space.values()):
        space = SearchSpace(space).to_json()
    return StudySpec(space=space, **{**QUICK_STUDY, **overrides})
