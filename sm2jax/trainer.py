"""Cohort trainer: K configurations trained together in one jitted program.

Layout. Every leaf of :class:`CohortState` has a leading trial axis of size K. One call of
:meth:`CohortTrainer.train` runs ``num_steps`` steps for all K trials in a single dispatch::

    lax.map(run_trial, state, batch_size=width)      # width trials vmapped at a time
      run_trial = fori_loop(step, num_steps)         # num_steps is traced: no recompile per budget
        step: per-trial batch -> grads -> clipped, scheduled update (optimizer state holds the
              trial's hyperparameters) -> NaN/inf guard

``width`` is the vmap width: ``width == K`` is one fully vmapped program, ``width == 1`` a loop over
trials inside the same program. Which is faster depends on model size and hardware (vmapping large
matmuls can be slower than a loop on a 2-core CPU), so :meth:`CohortTrainer.probe_width` measures it.

Isolation. A trial whose loss, gradients or new parameters are not finite is frozen inside the step
(``jnp.where`` on its own rows, so no other trial sees it): its parameters and optimizer state keep
their last finite values, ``diverged_at`` records the step, ``active`` turns false, and its data
position stops advancing.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Bool, Float, Int, PyTree, UInt32

from sm2jax.cohort import CohortSpec, hyperparameter_arrays, make_optimizer
from sm2jax.data import ArrayDataset, batch_indices, device_put_dataset, steps_per_epoch
from sm2jax.models import build_model


class CohortState(NamedTuple):
    """Everything a cohort needs to continue training; every leaf has a leading trial axis K."""

    params: PyTree  # nnx.State of nnx.Param, leaves [K, ...]
    model_state: PyTree  # nnx.State of everything else (batch statistics), leaves [K, ...]
    opt_state: PyTree  # optax InjectHyperparamsState; .hyperparams holds float32[K] arrays
    dropout_key: UInt32[Array, "K 2"]
    data_key: UInt32[Array, "K 2"]
    step: Int[Array, " K"]  # steps taken = the trial's data position
    trial_id: Int[Array, " K"]
    active: Bool[Array, " K"]
    diverged_at: Int[Array, " K"]  # -1 while finite


class TrainMetrics(NamedTuple):
    loss_mean: Float[Array, " K"]  # mean training loss over the call's active steps (NaN if none)
    loss_last: Float[Array, " K"]


class EvalMetrics(NamedTuple):
    loss: Float[Array, " K"]
    metric: Float[Array, " K"]  # accuracy, mse or perplexity (see TASK_METRIC)
    score: Float[Array, " K"]  # higher is better: accuracy, -mse, -log perplexity


TASK_METRIC = {"classification": "accuracy", "regression": "mse", "language_model": "perplexity"}


def trial_keys(seed: int, trial_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(init, dropout, data)`` raw PRNG keys of a trial: ``fold_in(PRNGKey(seed), trial_id)`` split
    three ways, so keys depend only on the trial, never on its cohort or position."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), trial_id)
    init, dropout, data = jax.random.split(base, 3)
    return init, dropout, data


def task_loss(task: str, outputs: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example loss and per-example metric numerator for ``task`` (float32)."""
    outputs = outputs.astype(jnp.float32)
    if task == "classification":
        loss = optax.softmax_cross_entropy_with_integer_labels(outputs, targets)
        return loss, (jnp.argmax(outputs, -1) == targets).astype(jnp.float32)
    if task == "regression":
        err = jnp.mean((outputs - targets) ** 2, axis=-1)
        return err, err
    if task == "language_model":
        loss = optax.softmax_cross_entropy_with_integer_labels(outputs, targets).mean(-1)
        return loss, loss
    raise ValueError(f"unknown task {task!r}")


@dataclasses.dataclass
class WidthProbe:
    """Result of :meth:`CohortTrainer.probe_width`: samples/s per candidate width and the choice."""

    samples_per_second: dict[int, float]
    skipped: dict[int, str]
    chosen: int
    steps: int

    def to_json(self) -> dict[str, Any]:
        return {
            "samples_per_second": {str(k): v for k, v in self.samples_per_second.items()},
            "skipped": {str(k): v for k, v in self.skipped.items()}, "chosen": self.chosen, "steps": self.steps,
        }


def memory_limit_bytes(device: jax.Device | None = None) -> int | None:
    """Bytes the device can hold: the allocator's limit on accelerators, physical RAM on CPU."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


class CohortTrainer:
    """Trains one cohort (configurations sharing a static signature) on a trial axis.

    Args:
      cohort: the configurations and their shared signature.
      dataset: training and validation arrays.
      schedule_steps: length T of the learning-rate schedule (the full budget, in steps).
      width: vmap width; ``None`` means all trials at once until :meth:`probe_width` chooses.
      eval_batch_size: validation examples per evaluation chunk.
      device_data: the data set's arrays already on the device (``data.device_put_dataset``), so
        that cohorts of one study share one copy.
    """

    def __init__(self, cohort: CohortSpec, dataset: ArrayDataset, *, schedule_steps: int, width: int | None = None, eval_batch_size: int = 512, device_data: dict[str, jax.Array] | None = None):
        sig = cohort.signature
        self.cohort = cohort
        self.dataset = dataset
        self.task = dataset.task
        self.batch_size = sig.batch_size
        self.num_train = dataset.num_train
        self.steps_per_epoch = steps_per_epoch(self.num_train, sig.batch_size)  # raises if B > N
        self.schedule_steps = int(schedule_steps)
        self.width = width
        self.eval_batch_size = min(eval_batch_size, len(dataset.x_val))
        self.data = device_data if device_data is not None else device_put_dataset(dataset)

        def build(key):
            return build_model(sig.model_spec, dataset.input_shape, dataset.num_outputs, dropout=sig.dropout, dtype=sig.dtype, key=key)

        self._build = build
        self.graphdef = nnx.split(nnx.eval_shape(lambda: build(jax.random.PRNGKey(0))), nnx.Param, ...)[0]
        self._train_jit = jax.jit(self._train_impl, static_argnames=("width",))
        self._eval_jit = jax.jit(self._eval_impl, static_argnames=("width",))
        self._init_jit = jax.jit(jax.vmap(self._init_one))
        # Ahead-of-time compiled programs (and their FLOP counts) keyed by (kind, trials, width):
        # compilation happens in compile_train/compile_eval (its own energy window), never inside a
        # training call.
        self._compiled: dict[tuple[str, int, int], Any] = {}

    # ------------------------------------------------------------------------------------ init

    def _init_one(self, init_key, hyperparameters):
        model = self._build(init_key)
        _, params, model_state = nnx.split(model, nnx.Param, ...)
        opt_state = make_optimizer(self.cohort.signature.optimizer, hyperparameters).init(params)
        return params, model_state, opt_state

    def init(self, configs: Sequence[Any] | None = None) -> CohortState:
        """Initialises every trial from its own keys (vmapped; one compile per cohort width)."""
        configs = list(configs if configs is not None else self.cohort.configs)
        keys = [trial_keys(c["seed"], c.trial_id) for c in configs]
        init_keys, dropout_keys, data_keys = (jnp.stack(k) for k in zip(*keys))
        hps = {k: jnp.asarray(v) for k, v in hyperparameter_arrays(configs, self.schedule_steps).items()}
        params, model_state, opt_state = self._init_jit(init_keys, hps)
        k = len(configs)
        return CohortState(
            params, model_state, opt_state, dropout_keys, data_keys,
            step=jnp.zeros(k, jnp.int32), trial_id=jnp.asarray([c.trial_id for c in configs], jnp.int32),
            active=jnp.ones(k, bool), diverged_at=jnp.full(k, -1, jnp.int32),
        )

    # ------------------------------------------------------------------------------------ train

    def _loss(self, params, model_state, x, y, key):
        model = nnx.merge(self.graphdef, params, model_state, copy=True)
        per_example, _ = task_loss(self.task, model(x, train=True, key=key), y)
        new_model_state = nnx.split(model, nnx.Param, ...)[2]
        return per_example.mean(), new_model_state

    def _trial_step(self, ts: CohortState, x_all, y_all):
        """One step of one trial (no trial axis here; vmapped by the caller)."""
        idx = batch_indices(ts.data_key, ts.step, self.num_train, self.batch_size)
        key = jax.random.fold_in(ts.dropout_key, ts.step)
        (loss, model_state), grads = jax.value_and_grad(self._loss, has_aux=True)(ts.params, ts.model_state, x_all[idx], y_all[idx], key)
        tx = make_optimizer(self.cohort.signature.optimizer, ts.opt_state.hyperparams)
        updates, opt_state = tx.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        finite = jnp.isfinite(loss)
        for leaf in jax.tree.leaves((grads, params, model_state)):
            finite &= jnp.all(jnp.isfinite(leaf))
        ok = ts.active & finite

        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        new = ts._replace(
            params=keep(params, ts.params), model_state=keep(model_state, ts.model_state),
            opt_state=keep(opt_state, ts.opt_state), step=ts.step + ok.astype(jnp.int32),
            active=ok, diverged_at=jnp.where(ts.active & ~finite, ts.step, ts.diverged_at),
        )
        return new, jnp.where(ok, loss, 0.0), ok

    def _train_impl(self, state: CohortState, num_steps, x_all, y_all, *, width: int):
        def run_trial(ts):
            def body(_, carry):
                ts, loss_sum, count, last = carry
                ts, loss, ok = self._trial_step(ts, x_all, y_all)
                return ts, loss_sum + loss, count + ok, jnp.where(ok, loss, last)

            init = (ts, jnp.float32(0), jnp.int32(0), jnp.float32(jnp.nan))
            ts, loss_sum, count, last = jax.lax.fori_loop(0, num_steps, body, init)
            return ts, TrainMetrics(jnp.where(count > 0, loss_sum / jnp.maximum(count, 1), jnp.nan), last)

        return jax.lax.map(run_trial, state, batch_size=width)

    def effective_width(self, k: int) -> int:
        return max(1, min(self.width or k, k))

    def compile_train(self, state: CohortState, width: int | None = None):
        """The compiled training program for this state's width (compiled once, then cached)."""
        k = state.step.shape[0]
        width = self.effective_width(k) if width is None else width
        key = ("train", k, width)
        if key not in self._compiled:
            lowered = self._train_jit.lower(state, jnp.int32(1), self.data["x_train"], self.data["y_train"], width=width)
            self._compiled[key] = lowered.compile()
        return self._compiled[key]

    def is_compiled(self, state: CohortState) -> bool:
        """Whether training and evaluation at this state's width are compiled already."""
        k = state.step.shape[0]
        w = self.effective_width(k)
        return ("train", k, w) in self._compiled and ("eval", k, w) in self._compiled

    def train(self, state: CohortState, num_steps: int) -> tuple[CohortState, TrainMetrics]:
        """Runs ``num_steps`` steps of every trial in one dispatch (asynchronous: block on the
        outputs before reading clocks or energy counters)."""
        return self.compile_train(state)(state, jnp.int32(num_steps), self.data["x_train"], self.data["y_train"])

    def flops_per_trial_step(self, state: CohortState) -> float | None:
        """FLOPs of one training step of one trial, from XLA's cost analysis (``None`` where the
        backend reports none). XLA counts a loop body once, whatever its trip count: the program's
        figure covers one step of one ``width``-wide chunk."""
        k = state.step.shape[0]
        key = ("flops", k, self.effective_width(k))
        if key not in self._compiled:
            flops = compiled_flops(self.compile_train(state))
            self._compiled[key] = None if flops is None else flops / key[2]
        return self._compiled[key]

    # ------------------------------------------------------------------------------------ eval

    def _eval_impl(self, state: CohortState, x_val, y_val, *, width: int):
        n, b = x_val.shape[0], self.eval_batch_size
        chunks = -(-n // b)
        pad = chunks * b - n
        xs = jnp.concatenate([x_val, jnp.zeros((pad, *x_val.shape[1:]), x_val.dtype)]).reshape(chunks, b, *x_val.shape[1:])
        ys = jnp.concatenate([y_val, jnp.zeros((pad, *y_val.shape[1:]), y_val.dtype)]).reshape(chunks, b, *y_val.shape[1:])
        mask = (jnp.arange(chunks * b) < n).reshape(chunks, b).astype(jnp.float32)

        def run_trial(ts):
            model = nnx.merge(self.graphdef, ts.params, ts.model_state, copy=True)

            def body(carry, chunk):
                x, y, m = chunk
                loss, metric = task_loss(self.task, model(x, train=False), y)
                return (carry[0] + (loss * m).sum(), carry[1] + (metric * m).sum()), None

            (loss_sum, metric_sum), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), (xs, ys, mask))
            return loss_sum / n, metric_sum / n

        loss, metric = jax.lax.map(run_trial, state, batch_size=width)
        if self.task == "classification":
            return EvalMetrics(loss, metric, metric)
        if self.task == "regression":
            return EvalMetrics(loss, metric, -metric)
        return EvalMetrics(loss, jnp.exp(metric), -metric)

    def compile_eval(self, state: CohortState):
        k = state.step.shape[0]
        key = ("eval", k, self.effective_width(k))
        if key not in self._compiled:
            self._compiled[key] = self._eval_jit.lower(state, self.data["x_val"], self.data["y_val"], width=key[2]).compile()
        return self._compiled[key]

    def evaluate(self, state: CohortState) -> EvalMetrics:
        """Validation loss and metric of every trial (vmapped at the trainer's width)."""
        return self.compile_eval(state)(state, self.data["x_val"], self.data["y_val"])

    # ------------------------------------------------------------------------------------ select

    @staticmethod
    def select(state: CohortState, indices: Sequence[int]) -> CohortState:
        """Gathers the rows ``indices`` of every leaf (survivors), on the host.

        Parameters, optimizer state (with each trial's hyperparameters), keys, step counters (data
        positions) and divergence flags travel together, so survivors continue exactly where they
        were. The result is a new state of width ``len(indices)``.
        """
        if len(indices) == 0:
            raise ValueError("select needs at least one index")
        idx = np.asarray(indices, dtype=np.int64)
        host = jax.device_get(state)
        return jax.device_put(jax.tree.map(lambda a: np.asarray(a)[idx], host))

    # ------------------------------------------------------------------------------------ width

    def probe_width(self, state: CohortState, *, steps: int = 5, repeats: int = 3, candidates: Sequence[int] | None = None, memory_fraction: float = 0.8) -> WidthProbe:
        """Measures samples/s of candidate vmap widths on this hardware and keeps the fastest.

        Every candidate is compiled and warmed first (compile time is not counted); then the
        candidates are timed round-robin, ``repeats`` rounds of one ``steps``-step call each,
        blocking on the outputs, and each keeps its best round (round-robin spreads the drift of a
        shared, noisy machine over all candidates). A width whose compiled program needs more than
        ``memory_fraction`` of the device memory is skipped and recorded. The state is not advanced
        (JAX is functional; results are discarded).
        """
        k = state.step.shape[0]
        if candidates is None:
            candidates = sorted({w for w in (1, 2, 4, 8, 16, 32, 64, k) if w <= k})
        limit = memory_limit_bytes()
        skipped: dict[int, str] = {}
        programs = {}
        args = (state, jnp.int32(steps), self.data["x_train"], self.data["y_train"])
        for w in candidates:
            compiled = self.compile_train(state, width=w)
            need = compiled_memory_bytes(compiled)
            if limit is not None and need is not None and need > memory_fraction * limit:
                skipped[w] = f"needs {need / 2**20:.0f} MiB of {limit / 2**20:.0f} MiB"
                continue
            jax.block_until_ready(compiled(*args))  # warm caches
            programs[w] = compiled
        if not programs:
            raise MemoryError(f"no vmap width fits in device memory: {skipped}")
        best = {w: np.inf for w in programs}
        for _ in range(repeats):
            for w, compiled in programs.items():
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(*args))
                best[w] = min(best[w], time.perf_counter() - t0)
        rates = {w: k * steps * self.batch_size / t for w, t in best.items()}
        chosen = max(rates, key=rates.get)
        self.width = chosen
        return WidthProbe(rates, skipped, chosen, steps)


def compiled_memory_bytes(compiled) -> int | None:
    """Bytes a compiled program needs (arguments + outputs + temporaries), if XLA reports them."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 -- not every backend implements it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def compiled_flops(compiled) -> float | None:
    """FLOPs of a compiled program from XLA's cost analysis, if reported."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])
