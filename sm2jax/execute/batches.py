"""The batches a cohort's programs read, drawn inside the jitted step: which examples a trial's
step takes (:func:`batch_indices`, a keyed Feistel permutation per epoch, so a trial's data position
is its step counter), its augmentation, and the splits on the devices (:func:`device_put_dataset`,
evaluated in fixed-shape blocks, :func:`eval_blocks`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, UInt32

from sm2jax.data import ArrayDataset


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the remainder is dropped; each epoch reshuffles)."""
    if batch_size > num_examples:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} training examples")
    return num_examples // batch_size


_FEISTEL_ROUNDS = 6


def _mix32(v: jax.Array) -> jax.Array:
    """The murmur3 32-bit finaliser: a cheap, well-mixing bijection on uint32."""
    v = v ^ (v >> 16)
    v = v * jnp.uint32(0x85EBCA6B)
    v = v ^ (v >> 13)
    v = v * jnp.uint32(0xC2B2AE35)
    return v ^ (v >> 16)


def _feistel(x: jax.Array, round_keys: jax.Array, half_bits: int) -> jax.Array:
    """A keyed bijection on ``[0, 2**(2 * half_bits))`` (balanced Feistel network)."""
    mask = jnp.uint32((1 << half_bits) - 1)
    left, right = x >> half_bits, x & mask
    for r in range(_FEISTEL_ROUNDS):
        left, right = right, left ^ (_mix32(right ^ round_keys[r]) & mask)
    return (left << half_bits) | right


def _round_keys(data_key: UInt32[Array, 2], epoch: Int[Array, ""]) -> UInt32[Array, " rounds"]:
    """The Feistel round keys of one epoch: the murmur3 finaliser over (key words, epoch, round).

    A hash, not ``jax.random``: threefry would add two 20-round hash networks to every training
    step's program, which made up a sixth of its XLA compile time on CPU; shuffling needs mixing,
    not cryptographic strength.
    """
    words = jnp.asarray(data_key, jnp.uint32)
    seed = _mix32(words[0] ^ _mix32(words[1] ^ _mix32(jnp.asarray(epoch).astype(jnp.uint32) + jnp.uint32(0x9E3779B9))))
    return _mix32(seed ^ (jnp.arange(_FEISTEL_ROUNDS, dtype=jnp.uint32) * jnp.uint32(0x632BE5AB)))


def batch_indices(
    data_key: UInt32[Array, 2], step: Int[Array, ""], num_examples: int, batch_size: int
) -> Int[Array, " batch"]:
    """Indices of the examples that a trial sees at ``step``.

    Epoch ``e`` visits every example once, in the order of a pseudo-random permutation keyed by
    ``(data_key, e)``; the step's batch is its ``step mod steps_per_epoch`` slice. The
    permutation is a Feistel network over the next power of four with cycle-walking back into
    ``[0, num_examples)``, so a step costs O(batch) instead of the O(N log N) of materialising
    ``jax.random.permutation`` per step (most of a small model's step; see the README).
    """
    per_epoch = steps_per_epoch(num_examples, batch_size)
    epoch, position = step // per_epoch, step % per_epoch
    half_bits = max(1, ((num_examples - 1).bit_length() + 1) // 2)
    round_keys = _round_keys(data_key, epoch)
    slots = (position * batch_size + jnp.arange(batch_size)).astype(jnp.uint32)
    limit = jnp.uint32(num_examples)

    def walk(x):
        first = _feistel(x, round_keys, half_bits)
        return jax.lax.while_loop(lambda y: y >= limit, lambda y: _feistel(y, round_keys, half_bits), first)

    return jax.vmap(walk)(slots).astype(jnp.int32)


AUGMENT_SALT = 0x61756731  # "aug1": the augmentation stream of a trial's data key


def crop_flip(images: Float[Array, "batch h w c"], key: jax.Array, pad: int = 4) -> Float[Array, "batch h w c"]:
    """Standard CIFAR augmentation (He et al. 2016): each image is zero-padded by ``pad`` pixels,
    cropped back to its size at a uniformly random offset in ``[0, 2 pad]`` per axis, and flipped
    left-right with probability 1/2. Traced inside the training step from the trial's own key, so
    every trial of a vmapped cohort draws its own crops and flips, reproducibly."""
    b, h, w, c = images.shape
    k_offset, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_offset, (b, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(k_flip, 0.5, (b,))
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(image, offset, flip):
        out = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
        return jnp.where(flip, out[:, ::-1], out)

    return jax.vmap(one)(padded, offsets, flips)


def augment_batch(kind: str, images: jax.Array, data_key: jax.Array, step: jax.Array) -> jax.Array:
    """The training batch at ``step`` after augmentation ``kind`` (``none`` or ``crop_flip``), keyed
    by (trial data key, step): the same trial sees the same augmented batch on a resumed run."""
    if kind == "none":
        return images
    if kind == "crop_flip":
        if images.ndim != 4:
            raise ValueError(
                f"augment 'crop_flip' needs image examples [H, W, C]; got examples of shape {tuple(images.shape[1:])}: use augment='none'"
            )
        return crop_flip(images, jax.random.fold_in(jax.random.fold_in(data_key, AUGMENT_SALT), step))
    raise ValueError(f"unknown augmentation {kind!r}")


# --------------------------------------------------------------------------------------- loaders


def eval_blocks(
    x: np.ndarray, y: np.ndarray, batch: int, chunks: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(x, y, mask)`` blocks of shape ``[chunks, batch, ...]`` covering every example once.

    The evaluation program is compiled for one block shape; a split of any length is evaluated as
    a few such blocks, zero-padded with a mask of 0, and the sums are added on the host. Built in
    numpy so that no eager device op (and no compile) is needed.
    """
    per = chunks * batch
    out = []
    for start in range(0, len(x), per):
        xb, yb = np.asarray(x[start : start + per]), np.asarray(y[start : start + per])
        pad = per - len(xb)
        mask = np.concatenate([np.ones(len(xb), np.float32), np.zeros(pad, np.float32)])
        xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
        yb = np.concatenate([yb, np.zeros((pad, *yb.shape[1:]), yb.dtype)])
        out.append(
            (
                xb.reshape(chunks, batch, *xb.shape[1:]),
                yb.reshape(chunks, batch, *yb.shape[1:]),
                mask.reshape(chunks, batch),
            )
        )
    return out


EVAL_BATCH_SIZE = 512


def device_put_dataset(
    ds: ArrayDataset, eval_batch_size: int = EVAL_BATCH_SIZE, placement: Any = None
) -> dict[str, Any]:
    """The arrays a cohort reads, on the default device, or replicated on every device of a
    :class:`~sm2jax.execute.placement.Placement` (transfers, not compiled ops).

    ``x_train``/``y_train`` as they are; ``val`` and ``test`` (``None`` without a test split) as lists
    of :func:`eval_blocks` of the validation split's block shape, so one evaluation program serves
    both splits.
    """
    batch = min(eval_batch_size, len(ds.x_val))
    chunks = -(-len(ds.x_val) // batch)
    one = jax.device_put if placement is None else placement.put_replicated
    put = lambda blocks: [tuple(one(a) for a in b) for b in blocks]
    return {
        "x_train": one(np.asarray(ds.x_train)),
        "y_train": one(np.asarray(ds.y_train)),
        "val": put(eval_blocks(ds.x_val, ds.y_val, batch, chunks)),
        "test": put(eval_blocks(ds.x_test, ds.y_test, batch, chunks)) if ds.has_test else None,
        "counts": {"val": len(ds.x_val), "test": len(ds.x_test) if ds.has_test else 0},
    }
