"""The strongest plain baseline a JAX user would write: one trial at a time, one jitted epoch each.

* ``init(key)``: jitted, one program per model (shared by every batch size and learning rate);
* ``epoch(params, opt_state, perm)``: one dispatch per epoch, a ``lax.scan`` over its batches;
  the learning rate is traced (``optax.inject_hyperparams``), so every learning rate of one batch
  size shares one program;
* ``accuracy(params)``: jitted validation accuracy.

Shuffling is a host-side ``numpy`` permutation per epoch, as in most hand-written loops. Programs are
cached per (model, batch size) within the process, as a careful user would.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sm2jax.execute.rows import trial_keys
from sm2jax.models import build_model


class PlainTrainer:
    """Per-trial jitted training of one model at one batch size (Adam, constant learning rate)."""

    def __init__(self, model_spec: dict, ds, batch_size: int):
        self.ds, self.batch_size = ds, batch_size
        self.steps_per_epoch = ds.num_train // batch_size
        self.x, self.y = jax.device_put(ds.x_train), jax.device_put(ds.y_train)
        self.x_val, self.y_val = jax.device_put(ds.x_val), jax.device_put(ds.y_val)
        self._init, self._epoch, self._accuracy = _programs(
            json.dumps(model_spec, sort_keys=True), ds.input_shape, ds.num_outputs, batch_size
        )

    def init(self, seed: int, trial_id: int, learning_rate: float):
        key = trial_keys(seed, trial_id)[0]
        return self._init(key, np.float32(learning_rate))

    def epoch(self, state, rng: np.random.Generator):
        perm = rng.permutation(self.ds.num_train)[: self.steps_per_epoch * self.batch_size].reshape(
            self.steps_per_epoch, self.batch_size
        )
        params, opt_state, loss = self._epoch(*state, self.x, self.y, perm.astype(np.int32))
        return (params, opt_state), loss

    def accuracy(self, state) -> float:
        return float(self._accuracy(state[0], self.x_val, self.y_val))


@functools.cache
def _graph(model_json: str, input_shape: tuple, num_outputs: int):
    model = nnx.eval_shape(
        lambda: build_model(json.loads(model_json), input_shape, num_outputs, key=jax.random.PRNGKey(0))
    )
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the plain baseline covers models without batch statistics")
    return graphdef, rest


@functools.cache
def _init_program(model_json: str, input_shape: tuple, num_outputs: int):
    @jax.jit
    def init(key, learning_rate):
        _, params, _ = nnx.split(build_model(json.loads(model_json), input_shape, num_outputs, key=key), nnx.Param, ...)
        return params, optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate).init(params)

    return init


@functools.cache
def _programs(model_json: str, input_shape: tuple, num_outputs: int, batch_size: int):
    graphdef, rest = _graph(model_json, input_shape, num_outputs)
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=1.0)  # the real rate lives in opt_state

    def loss_fn(params, x, y):
        model = nnx.merge(graphdef, params, rest)
        return optax.softmax_cross_entropy_with_integer_labels(model(x, train=True), y).mean()

    @jax.jit
    def epoch(params, opt_state, x, y, perm):
        def step(carry, idx):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), perm)
        return params, opt_state, losses.mean()

    @jax.jit
    def accuracy(params, x, y):
        logits = nnx.merge(graphdef, params, rest)(x, train=False)
        return jnp.mean(jnp.argmax(logits, -1) == y)

    return _init_program(model_json, input_shape, num_outputs), epoch, accuracy


# ------------------------------------------------------------------- optimizer, decay and dropout


def _plain_optimizer(name: str):
    """What a careful user writes: ``inject_hyperparams`` so the learning rate and weight decay are
    traced (sgd: coupled L2 and momentum 0.9; adam ignores the decay; adamw: decoupled), as sm2jax's
    built-in three."""
    if name == "sgd":

        def sgd(learning_rate, weight_decay):
            return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=0.9))

        return optax.inject_hyperparams(sgd)
    if name == "adam":
        return optax.inject_hyperparams(lambda learning_rate, weight_decay: optax.adam(learning_rate))
    return optax.inject_hyperparams(optax.adamw)


class PlainRegularisedTrainer(PlainTrainer):
    """:class:`PlainTrainer` with an optimizer of sgd/adam/adamw, a traced weight decay and a traced
    dropout rate (the model's ``dropout=`` call argument, masks from a per-trial key): one program
    per (optimizer, batch size), every learning rate, decay and rate sharing it."""

    def __init__(self, model_spec: dict, ds, batch_size: int, optimizer: str):
        self.ds, self.batch_size = ds, batch_size
        self.steps_per_epoch = ds.num_train // batch_size
        self.x, self.y = jax.device_put(ds.x_train), jax.device_put(ds.y_train)
        self.x_val, self.y_val = jax.device_put(ds.x_val), jax.device_put(ds.y_val)
        self._init, self._epoch, self._accuracy = _regularised_programs(
            json.dumps(model_spec, sort_keys=True), ds.input_shape, ds.num_outputs, batch_size, optimizer
        )

    def init(self, seed: int, trial_id: int, learning_rate: float, weight_decay: float = 0.0, dropout: float = 0.0):
        init_key, dropout_key, _ = trial_keys(seed, trial_id)
        params, opt_state = self._init(init_key, np.float32(learning_rate), np.float32(weight_decay))
        return params, opt_state, dropout_key, np.float32(dropout), 0

    def epoch(self, state, rng: np.random.Generator):
        params, opt_state, key, rate, count = state
        perm = rng.permutation(self.ds.num_train)[: self.steps_per_epoch * self.batch_size].reshape(
            self.steps_per_epoch, self.batch_size
        )
        params, opt_state, loss = self._epoch(
            params, opt_state, self.x, self.y, perm.astype(np.int32), jax.random.fold_in(key, count), rate
        )
        return (params, opt_state, key, rate, count + 1), loss

    def accuracy(self, state, split: str = "val") -> float:
        x, y = (self.x_val, self.y_val) if split == "val" else (self.ds.x_test, self.ds.y_test)
        return float(self._accuracy(state[0], x, y))


@functools.cache
def _regularised_programs(model_json: str, input_shape: tuple, num_outputs: int, batch_size: int, optimizer: str):
    graphdef, rest = _graph(model_json, input_shape, num_outputs)
    make = _plain_optimizer(optimizer)
    tx = make(learning_rate=1.0, weight_decay=0.0)  # the real values live in opt_state

    @jax.jit
    def init(key, learning_rate, weight_decay):
        model = build_model(json.loads(model_json), input_shape, num_outputs, key=key)
        _, params, _ = nnx.split(model, nnx.Param, ...)
        return params, make(learning_rate=learning_rate, weight_decay=weight_decay).init(params)

    def loss_fn(params, x, y, key, rate):
        model = nnx.merge(graphdef, params, rest)
        return optax.softmax_cross_entropy_with_integer_labels(model(x, train=True, key=key, dropout=rate), y).mean()

    @jax.jit
    def epoch(params, opt_state, x, y, perm, key, rate):
        def step(carry, t_idx):
            params, opt_state = carry
            t, idx = t_idx
            loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx], jax.random.fold_in(key, t), rate)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        steps = jnp.arange(perm.shape[0])
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (steps, perm))
        return params, opt_state, losses.mean()

    @jax.jit
    def accuracy(params, x, y):
        logits = nnx.merge(graphdef, params, rest)(x, train=False)
        return jnp.mean(jnp.argmax(logits, -1) == y)

    return init, epoch, accuracy
