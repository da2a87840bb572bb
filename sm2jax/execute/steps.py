"""The maths of a cohort's three programs, as module-level functions of explicit static settings.

Each function takes a frozen settings dataclass first (everything it reads besides its arrays) and
arrays after; :class:`sm2jax.execute.programs.Program` jits it with the settings bound, so a program's key
is exactly what jit sees. A chunk of W trials trains as::

    vmap(run_trial)(chunk)                       # W trials side by side
      run_trial = fori_loop(step, num_steps)     # num_steps is traced: no recompile per budget
        step: per-trial batch -> grads -> clipped, scheduled update (optimizer state holds the
              trial's hyperparameters: the optimizer's, and the dropout rate and loss
              hyperparameters the model and task read) -> NaN/inf guard

* :func:`init_trial` (:class:`InitSettings`): one trial, no trial axis; keys derived inside from
  ``(seed, trial_id)``. Shared by every cohort with the same model, optimizer and input shape:
  models take their dropout rate traced (or hold it as a static attribute) and apply it with the
  ``key`` they are called with, so init builds at rate 0 and its rows serve every rate and batch
  size.
* :func:`train_chunk` (:class:`TrainSettings`): W trials, sharded over the placement's devices.
* :func:`eval_chunk` (:class:`EvalSettings`): W trials' parameters and model state only: cohorts
  that differ only in batch size, optimizer or dropout share it.

Isolation. A trial whose loss, gradients or batch statistics are not finite is frozen inside the
step (``jnp.where`` on its own rows, so no other trial sees it): that step's update is not applied,
its parameters and batch statistics keep their values, ``diverged_at`` records the step, ``active``
turns false, and its data position stops advancing. (Its optimizer moments are not kept: a frozen
trial never trains again.) An update that overflows finite parameters (absurd learning rates) shows
as a non-finite loss one step later and freezes the trial there. Padding rows are inactive from the
start: they take no step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Float

from sm2jax.cohort import make_optimizer
from sm2jax.execute.batches import augment_batch, batch_indices
from sm2jax.execute.placement import Placement
from sm2jax.execute.rows import CohortState, trial_keys
from sm2jax.tasks import Task
from sm2jax.vocabulary import Optimizer, default_of


class TrainMetrics(NamedTuple):
    loss_mean: Float[Array, " W"]  # mean training loss over the call's active steps (NaN if none)
    loss_last: Float[Array, " W"]


@dataclasses.dataclass(frozen=True)
class InitSettings:
    """What :func:`init_trial` reads: the model's builder (a re-registered model is another
    builder), its spec as canonical JSON, the example shape, outputs, dtype and the optimizer (a
    re-registered optimizer is another factory)."""

    builder: Callable[..., nnx.Module]
    model: str
    input_shape: tuple[int, ...]
    num_outputs: int
    dtype: str
    optimizer: Optimizer

    def build(self, key: jax.Array, dropout: float = 0.0) -> nnx.Module:
        rngs = nnx.Rngs(params=key)
        return self.builder(
            json.loads(self.model), self.input_shape, self.num_outputs, dropout, jnp.dtype(self.dtype), rngs
        )


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What :func:`eval_chunk` reads: the model's graph (built at dropout 0), the task, the devices."""

    graphdef: Any
    task: Task
    placement: Placement


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What :func:`train_chunk` reads: the model's graph at its static dropout rate, the task,
    optimizer, batch size, training-set size, whether masks are drawn, the traced hyperparameters
    the model takes, augmentation and the devices."""

    graphdef: Any
    task: Task
    optimizer: Optimizer
    batch_size: int
    num_train: int
    draws_masks: bool
    model_hyperparameters: tuple[str, ...]
    augment: str
    placement: Placement


def task_loss(task: Task, outputs: jax.Array, targets: jax.Array, hyperparameters=None) -> tuple[jax.Array, jax.Array]:
    """Per-example loss and per-example metric of ``task`` (float32); the loss takes the task's
    traced ``hyperparameters`` (default: the vocabulary's defaults, as in evaluation)."""
    if hyperparameters is None:
        hyperparameters = {n: default_of(n) for n in task.hyperparameters}
    outputs = outputs.astype(jnp.float32)
    loss = task.loss(outputs, targets, **hyperparameters).astype(jnp.float32)
    return loss, task.metric(outputs, targets).astype(jnp.float32)


def map_trials(fn, *trees):
    """``jax.vmap(fn)(*trees)``, except at width 1, where the trial axis is squeezed and restored: a
    one-wide batched matmul takes XLA's general batched-dot path, not the plain GEMM of a single
    trial (several times slower per step on a CPU)."""
    if jax.tree.leaves(trees)[0].shape[0] != 1:
        return jax.vmap(fn)(*trees)
    out = fn(*jax.tree.map(lambda a: a[0], trees))
    return jax.tree.map(lambda a: a[None], out)


# ---------------------------------------------------------------------------------------- init


def init_trial(s: InitSettings, seed, trial_id, hyperparameters):
    """One trial's parameters, model state, optimizer state (holding its hyperparameters) and keys."""
    init_key, dropout_key, data_key = trial_keys(seed, trial_id)
    _, params, model_state = nnx.split(s.build(init_key), nnx.Param, ...)
    opt_state = make_optimizer(s.optimizer, hyperparameters).init(params)
    return params, model_state, opt_state, dropout_key, data_key


# ---------------------------------------------------------------------------------------- train


def _loss(s: TrainSettings, params, model_state, x, y, key, hps):
    model = nnx.merge(s.graphdef, params, model_state, copy=True)
    outputs = model(x, train=True, key=key, **{n: hps[n] for n in s.model_hyperparameters})
    per_example, _ = task_loss(s.task, outputs, y, {n: hps[n] for n in s.task.hyperparameters})
    new_model_state = nnx.split(model, nnx.Param, ...)[2]
    return per_example.mean(), new_model_state


def trial_step(s: TrainSettings, ts: CohortState, x_all, y_all):
    """One step of one trial (no trial axis here; vmapped by the caller)."""
    idx = batch_indices(ts.data_key, ts.step, s.num_train, s.batch_size)
    # Dropout masks from the trial's own key and step; no key work in programs without dropout.
    key = jax.random.fold_in(ts.dropout_key, ts.step) if s.draws_masks else None
    x = augment_batch(s.augment, x_all[idx], ts.data_key, ts.step)
    loss_fn = functools.partial(_loss, s)
    (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        ts.params, ts.model_state, x, y_all[idx], key, ts.opt_state.hyperparams
    )
    # Decided before the update, from values the step has anyway: the loss, the gradients' global
    # norm (the one clipping computes; XLA merges the two) and the new batch statistics. Known
    # before the optimizer runs, the keep-or-freeze select fuses into the update itself: one pass
    # over parameters and optimizer state, as in a plain loop (a check of the new parameters would
    # cost two more passes).
    stats = sum((jnp.sum(leaf, dtype=jnp.float32) for leaf in jax.tree.leaves(model_state)), jnp.float32(0))
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads)) & jnp.isfinite(stats)
    ok = ts.active & finite
    tx = make_optimizer(s.optimizer, ts.opt_state.hyperparams)
    updates, opt_state = tx.update(grads, ts.opt_state, ts.params)
    # Frozen parameters take a zero update: the select sits inside the update's own fusion. The
    # optimizer state of a frozen trial is not kept (it never trains again, and keeping it costs a
    # select pass over every moment).
    params = optax.apply_updates(ts.params, jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates))
    opt_state = opt_state._replace(hyperparams=ts.opt_state.hyperparams)  # a trial's hyperparameters never change

    new = ts._replace(
        params=params,
        model_state=jax.tree.map(lambda a, b: jnp.where(ok, a, b), model_state, ts.model_state),
        opt_state=opt_state,
        step=ts.step + ok.astype(jnp.int32),
        active=ok,
        diverged_at=jnp.where(ts.active & ~finite, ts.step, ts.diverged_at),
    )
    return new, jnp.where(ok, loss, 0.0), ok


def train_chunk(s: TrainSettings, state: CohortState, num_steps, x_all, y_all):
    """``num_steps`` steps of every trial of a chunk, each device training its own rows."""

    def rows(state, num_steps, x_all, y_all):  # one device's rows (all rows on one device)
        def run_trial(ts):
            def body(_, carry):
                ts, loss_sum, count, last = carry
                ts, loss, ok = trial_step(s, ts, x_all, y_all)
                return ts, loss_sum + loss, count + ok, jnp.where(ok, loss, last)

            init = (ts, jnp.float32(0), jnp.int32(0), jnp.float32(jnp.nan))
            ts, loss_sum, count, last = jax.lax.fori_loop(0, num_steps, body, init)
            return ts, TrainMetrics(jnp.where(count > 0, loss_sum / jnp.maximum(count, 1), jnp.nan), last)

        if s.placement.size == 1:
            return map_trials(run_trial, state)
        # A device whose rows are all inactive (padding, or diverged trials) skips the whole call:
        # padding costs no computation, and no energy, on its device.
        w = state.step.shape[0]
        idle = lambda st: (st, TrainMetrics(jnp.full(w, jnp.nan, jnp.float32), jnp.full(w, jnp.nan, jnp.float32)))
        return jax.lax.cond(jnp.any(state.active), lambda st: map_trials(run_trial, st), idle, state)

    # Each device trains its own rows: no collective (the data set and num_steps are replicated).
    return s.placement.map_rows(rows, state, num_steps, x_all, y_all, replicated=3)


# ---------------------------------------------------------------------------------------- eval


def eval_chunk(s: EvalSettings, params, model_state, xs, ys, mask):
    """Per row: sums of the per-example loss, metric and squared metric over one masked block."""

    def rows(params, model_state, xs, ys, mask):  # one device's rows
        def run_trial(params, model_state):
            model = nnx.merge(s.graphdef, params, model_state, copy=True)

            def body(carry, block):
                x, y, m = block
                loss, metric = task_loss(s.task, model(x, train=False), y)
                return (
                    carry[0] + (loss * m).sum(),
                    carry[1] + (metric * m).sum(),
                    carry[2] + (metric * metric * m).sum(),
                ), None

            zero = jnp.float32(0)
            sums, _ = jax.lax.scan(body, (zero, zero, zero), (xs, ys, mask))
            return sums

        return map_trials(run_trial, params, model_state)

    return s.placement.map_rows(rows, params, model_state, xs, ys, mask, replicated=3)
