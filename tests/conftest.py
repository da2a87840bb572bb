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
