"""A cohort's rows: the per-trial state pytree, and moving rows between the host and device chunks.

A cohort of K trials is held as ``ceil(K / W)`` *chunks* of exactly W rows (its vmap width); the
last chunk is padded with inactive rows (``trial_id == -1``, ``active == False``). Survivor selection
gathers rows on the host and re-chunks them: the chunk count and the padding change, the programs
(which depend on W only) do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
from jaxtyping import Array, Bool, Int, PyTree, UInt32

from sm2jax.execute.placement import Placement, default_placement


class CohortState(NamedTuple):
    """Everything a chunk of trials needs to continue training; every leaf has a leading trial axis
    (W in a chunk, K when a cohort's rows are gathered on the host)."""

    params: PyTree  # nnx.State of nnx.Param, leaves [W, ...]
    model_state: PyTree  # nnx.State of everything else (batch statistics), leaves [W, ...]
    opt_state: PyTree  # optax InjectHyperparamsState; .hyperparams holds float32[W] arrays
    dropout_key: UInt32[Array, "W 2"]
    data_key: UInt32[Array, "W 2"]
    step: Int[Array, " W"]  # steps taken = the trial's data position
    trial_id: Int[Array, " W"]  # -1 on padding rows
    active: Bool[Array, " W"]
    diverged_at: Int[Array, " W"]  # -1 while finite


PADDING_ID = -1


def trial_keys(seed, trial_id) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(init, dropout, data)`` raw PRNG keys of a trial: ``fold_in(PRNGKey(seed), trial_id)`` split
    three ways, so keys depend only on the trial, never on its cohort or position."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), trial_id)
    init, dropout, data = jax.random.split(base, 3)
    return init, dropout, data


def num_chunks(k: int, width: int) -> int:
    return -(-k // width)


def chunk_rows(rows: CohortState, width: int, placement: Placement | None = None) -> list[CohortState]:
    """Splits host rows (leaves ``[K, ...]``, numpy) into ``ceil(K / width)`` chunks of exactly
    ``width`` rows; the last is padded with copies of row 0 marked inactive with trial id -1 (a
    finite, well-formed row that takes no step and is never reported). Each chunk is sharded over
    the ``placement``'s devices (default: one device); ``width`` must be a multiple of their count.
    Trials sit at :meth:`Placement.slots <sm2jax.execute.placement.Placement.slots>` (in order on one
    device; spread over the devices on several)."""
    placement = placement or default_placement()
    if width % placement.size:
        raise ValueError(f"width {width} is not a multiple of the {placement.size} devices of the trials axis")
    k = int(np.shape(rows.step)[0])
    if k == 0:
        raise ValueError("a cohort needs at least one row")
    total = num_chunks(k, width) * width
    slots = placement.slots(k, width)
    idx = np.zeros(total, np.int64)  # padding rows copy row 0
    idx[slots] = np.arange(k)
    real = np.zeros(total, bool)
    real[slots] = True
    padded = jax.tree.map(lambda a: np.asarray(a)[idx], rows)
    if total > k:
        padded = padded._replace(
            trial_id=np.where(real, padded.trial_id, PADDING_ID).astype(np.int32),
            active=padded.active & real,
            diverged_at=np.where(real, padded.diverged_at, -1).astype(np.int32),
        )
    return [
        placement.put_rows(jax.tree.map(lambda a: a[i * width : (i + 1) * width], padded))
        for i in range(total // width)
    ]


def gather_rows(
    chunks: Sequence[CohortState], trial_ids: Sequence[int], placement: Placement | None = None
) -> CohortState:
    """The rows of ``trial_ids`` (in that order) from device chunks, as host numpy arrays (on every
    process of a multi-process study)."""
    host = (placement or default_placement()).host(list(chunks))
    stacked = jax.tree.map(lambda *a: np.concatenate(a), *host)
    where = {int(t): i for i, t in enumerate(np.asarray(stacked.trial_id)) if t != PADDING_ID}
    missing = [t for t in trial_ids if t not in where]
    if missing:
        raise KeyError(f"trials {missing} are not rows of this cohort")
    idx = np.asarray([where[int(t)] for t in trial_ids], np.int64)
    return jax.tree.map(lambda a: a[idx], stacked)


def row_view(chunks: Sequence[CohortState], field: str, k: int, placement: Placement | None = None) -> np.ndarray:
    """One per-trial field (e.g. ``step``, ``active``) of the first ``k`` rows, on the host."""
    placement = placement or default_placement()
    return np.concatenate(placement.host([getattr(c, field) for c in chunks]))[
        placement.slots(k, int(np.shape(chunks[0].step)[0]))
    ]


def take_rows(rows: CohortState, k: int) -> CohortState:
    """The first ``k`` host rows."""
    return jax.tree.map(lambda a: a[:k], rows)
