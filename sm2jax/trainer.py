"""Cohort trainer: configurations of one static signature trained by fixed-width compiled programs.

Compile once. A compiled program depends on the cohort's static signature and a vmap *width* W,
never on how many trials are alive. A cohort of K trials is held as ``ceil(K / W)`` *chunks*, each a
:class:`CohortState` whose leaves have a leading axis of exactly W; the last chunk is padded with
inactive rows (``trial_id == -1``, ``active == False``). One call of :meth:`CohortTrainer.train` runs
``num_steps`` steps of one chunk in a single dispatch::

    vmap(run_trial)(chunk)                       # W trials side by side
      run_trial = fori_loop(step, num_steps)     # num_steps is traced: no recompile per budget
        step: per-trial batch -> grads -> clipped, scheduled update (optimizer state holds the
              trial's hyperparameters) -> NaN/inf guard

Survivor selection gathers rows on the host and re-chunks them (:func:`chunk_rows`): the chunk count
and the padding change, the programs do not.

Devices. A chunk is sharded over the ``trials`` axis of the trainer's
:class:`~sm2jax.placement.Placement` (``jax.shard_map``): each device runs the vmapped loop above on
its own ``W / n`` rows, with no collective; the data set is replicated. A device whose rows are all
inactive skips the call (``lax.cond``), so padding costs no computation. Training donates the chunk's
buffers: a device holds one copy of its rows. Three programs serve a cohort:

* ``init``: one trial, no trial axis (keys derived inside from ``(seed, trial_id)``); shared by every
  cohort with the same model, optimizer and input shape (batch size and dropout do not change it).
  On a CPU backend it is built with :data:`INIT_COMPILE`: 1.3-5.5x faster to compile, the same bits.
* ``train``: W trials, keyed by the whole signature and W.
* ``eval``: W trials' parameters and model state only, keyed by the model and W: cohorts that differ
  only in batch size, optimizer or dropout share it.

Compiled programs live in a process-wide table (:func:`compiled_program`), so a second cohort or study
of the same shapes compiles nothing; JAX's persistent compilation cache (:mod:`sm2jax.compile_cache`)
carries them across processes.

Quick programs. On a CPU backend the training program can also be compiled *quick*
(:data:`QUICK_COMPILE`: XLA's CPU compiler without its fusion emitters): it compiles in about half
the time and steps 1.04-2.1x slower (2 CPU cores, MLPs from 64 to 1024x1024 units), and its results
differ from the optimised program's by float rounding (~2e-6 after 200 steps), as another width's do.
:class:`sm2jax.runner.CohortRunner` starts a cohort quick and compiles the optimised program once its
remaining training pays for it.

Which width is fastest depends on model size and hardware (vmapping large matmuls can be slower than
a loop on a 2-core CPU); :meth:`CohortTrainer.probe_width` measures it, and
:class:`sm2jax.runner.CohortRunner` decides when measuring pays for its compilation.

Isolation. A trial whose loss, gradients or batch statistics are not finite is frozen inside the
step (``jnp.where`` on its own rows, so no other trial sees it): that step's update is not applied,
its parameters and batch statistics keep their values, ``diverged_at`` records the step, ``active``
turns false, and its data position stops advancing. (Its optimizer moments are not kept: a frozen
trial never trains again.) An update that overflows finite parameters
(absurd learning rates) shows as a non-finite loss one step later and freezes the trial there.
Padding rows are inactive from the start: they take no step.
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

from sm2jax.cohort import OPTIMIZER_HYPERPARAMETERS, CohortSpec, hyperparameter_arrays, make_optimizer
from sm2jax.data import ArrayDataset, augment_batch, batch_indices, device_put_dataset, steps_per_epoch
from sm2jax.models import build_model, model_version
from sm2jax.placement import Placement, default_placement
from sm2jax.tasks import get_task


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


class TrainMetrics(NamedTuple):
    loss_mean: Float[Array, " W"]  # mean training loss over the call's active steps (NaN if none)
    loss_last: Float[Array, " W"]


class EvalMetrics(NamedTuple):
    """Host (numpy) arrays over a chunk's rows; NaN for a diverged row."""

    loss: Float[np.ndarray, " W"]
    metric: Float[np.ndarray, " W"]  # the task's reported metric (accuracy, mse, perplexity...)
    score: Float[np.ndarray, " W"]  # higher is better: the mean metric, negated when lower is better
    score_se: Float[np.ndarray, " W"]  # standard error of the score from the split's sampling noise


PADDING_ID = -1


def trial_keys(seed, trial_id) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(init, dropout, data)`` raw PRNG keys of a trial: ``fold_in(PRNGKey(seed), trial_id)`` split
    three ways, so keys depend only on the trial, never on its cohort or position."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), trial_id)
    init, dropout, data = jax.random.split(base, 3)
    return init, dropout, data


def task_loss(task: str, outputs: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example loss and per-example metric of the registered ``task`` (float32)."""
    t = get_task(task)
    outputs = outputs.astype(jnp.float32)
    return t.loss(outputs, targets).astype(jnp.float32), t.metric(outputs, targets).astype(jnp.float32)


# ------------------------------------------------------------------------------------ host rows


def num_chunks(k: int, width: int) -> int:
    return -(-k // width)


def chunk_rows(rows: CohortState, width: int, placement: Placement | None = None) -> list[CohortState]:
    """Splits host rows (leaves ``[K, ...]``, numpy) into ``ceil(K / width)`` chunks of exactly
    ``width`` rows; the last is padded with copies of row 0 marked inactive with trial id -1 (a
    finite, well-formed row that takes no step and is never reported). Each chunk is sharded over
    the ``placement``'s devices (default: one device); ``width`` must be a multiple of their count.
    Trials sit at :meth:`Placement.slots <sm2jax.placement.Placement.slots>` (in order on one
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


# ------------------------------------------------------------------------------------ programs

_PROGRAMS: dict[tuple, tuple[Any, float]] = {}

QUICK_COMPILE = {"xla_cpu_use_fusion_emitters": False}
"""XLA options of a quick-compiling program on a CPU backend. Measured on 2 CPU cores (training
program, 2 host devices): compile 0.56-0.81 s instead of 1.05-1.31 s, and a step 1.04-2.1x slower
(MLP [64] on digits at batch 16: 60 us instead of 31 us; MLP 256x256 on MNIST-1D at batch 128:
1.48 ms instead of 1.16 ms). No other CPU option measured (verification level, XNNPACK, schedulers,
copy insertion) changed compile time; ``-O0`` compiled slower than this and stepped 4x slower."""


INIT_COMPILE = {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False}
"""XLA options of the init program on a CPU backend. Initialisation runs once per trial, so how fast
XLA's code runs matters little; how long XLA takes to compile it is paid by every study. Its cost is
the random number generation every parameter's initializer traces (a threefry hash per draw, an
``erf_inv`` polynomial per truncated normal), which LLVM optimises for seconds at ``-O2``. Measured
on 2 CPU cores, compile seconds with XLA's defaults -> with these options: MLP [64] 1.20 -> 0.22,
small CNN 2.16 -> 0.37, CNN1D 1.77 -> 0.55, GRU 0.84 -> 0.44, LSTM 0.86 -> 0.49, Transformer
2.34 -> 1.82, ResNet-18 (width 8) 10.5 -> 2.6; running one init took about as long (MLPs and CNNs
within noise, ResNet-18 at width 64 146 -> 180 ms). The parameters are the same bits as a plain ``build_model`` (eager or
jitted with defaults), in float32 and bfloat16: ``-O1`` keeps the floating-point contractions that
``-O0`` drops (at ``-O0`` ``erf_inv`` differs by one ulp), and the fusion emitters only change how
loops are generated. ``tests/test_trainer.py`` asserts the equality for the built-in models."""


def compiled_program(key: tuple, lower, options: dict[str, Any] | None = None) -> tuple[Any, float]:
    """The compiled program for ``key`` from the process-wide table, lowering and compiling it with
    ``lower()`` (and XLA ``options``, which ``key`` must distinguish) on a miss. Returns
    ``(compiled, seconds its compilation took)``: what it cost when it was compiled (or loaded from
    the persistent cache), the figure a width decision weighs.
    """
    if key not in _PROGRAMS:
        t0 = time.perf_counter()
        compiled = lower().compile(compiler_options=options) if options else lower().compile()
        _PROGRAMS[key] = (compiled, time.perf_counter() - t0)
    return _PROGRAMS[key]


def program_options(kind: str, quick: bool = False) -> dict[str, Any] | None:
    """XLA options of a ``kind`` program (``init``, ``train``, ``eval``) on this process's backend:
    :data:`QUICK_COMPILE` for a quick training build, :data:`INIT_COMPILE` for init on a CPU backend,
    else ``None`` (XLA's defaults). They follow from the kind, the build and the process's one
    backend, which a program's key fixes, as :func:`compiled_program` requires."""
    if quick:
        return QUICK_COMPILE
    if kind == "init" and jax.default_backend() == "cpu":
        return INIT_COMPILE
    return None


def _abstract(tree) -> Any:
    return jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), tree)


@dataclasses.dataclass
class WidthProbe:
    """Result of :meth:`CohortTrainer.probe_width`: samples/s per candidate width and the choice."""

    samples_per_second: dict[int, float]
    chosen: int
    steps: int

    def to_json(self) -> dict[str, Any]:
        return {
            "samples_per_second": {str(k): v for k, v in self.samples_per_second.items()},
            "chosen": self.chosen,
            "steps": self.steps,
        }


def memory_limit_bytes(device: jax.Device | None = None) -> int | None:
    """Bytes the device can hold: the allocator's limit on accelerators, physical RAM on CPU."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


class CohortTrainer:
    """Programs of one cohort signature: init one trial, train and evaluate W-wide chunks.

    The trainer is stateless apart from its compiled programs: chunks (:class:`CohortState`) are
    passed in and returned; which rows and which width a cohort uses is its runner's business.

    Args:
      cohort: the configurations and their shared signature.
      dataset: training and validation arrays.
      schedule_steps: length T of the learning-rate schedule (the full budget, in steps).
      eval_batch_size: validation examples per evaluation chunk.
      device_data: the data set's arrays already on the device (``data.device_put_dataset``), so
        that cohorts of one study share one copy (replicated over ``placement``).
      placement: the ``trials`` mesh chunks are sharded over (default: one device); chunk widths
        are multiples of its device count.
    """

    def __init__(
        self,
        cohort: CohortSpec,
        dataset: ArrayDataset,
        *,
        schedule_steps: int,
        eval_batch_size: int = 512,
        device_data: dict[str, jax.Array] | None = None,
        placement: Placement | None = None,
    ):
        sig = cohort.signature
        self.cohort = cohort
        self.dataset = dataset
        self.task = dataset.task
        self.batch_size = sig.batch_size
        self.num_train = dataset.num_train
        self.steps_per_epoch = steps_per_epoch(self.num_train, sig.batch_size)  # raises if B > N
        if sig.augment != "none" and len(dataset.input_shape) != 3:
            raise ValueError(
                f"augment {sig.augment!r} needs image examples [H, W, C]; {dataset.name!r} has examples of shape {dataset.input_shape}: use augment='none'"
            )
        self.schedule_steps = int(schedule_steps)
        self.placement = placement or default_placement()
        self.data = (
            device_data if device_data is not None else device_put_dataset(dataset, eval_batch_size, self.placement)
        )

        def build(key):
            return build_model(
                sig.model_spec, dataset.input_shape, dataset.num_outputs, dropout=sig.dropout, dtype=sig.dtype, key=key
            )

        self._build = build
        self.graphdef = nnx.split(nnx.eval_shape(lambda: build(jax.random.PRNGKey(0))), nnx.Param, ...)[0]
        data_shapes = _abstract({k: self.data[k] for k in ("x_train", "y_train")})
        eval_block = _abstract(self.data["val"][0])
        model = (
            sig.model,
            model_version(sig.model_spec["name"]),
            sig.dtype,
            tuple(dataset.input_shape),
            dataset.num_outputs,
        )
        task = (self.task, get_task(self.task).version)  # a re-registered model or task never reuses a program
        # What each program depends on, and nothing more (see the module docstring).
        self._keys = {
            "init": ("init", *model, sig.optimizer),
            "train": (
                "train",
                *model,
                sig.optimizer,
                sig.batch_size,
                sig.dropout,
                sig.augment,
                task,
                data_shapes["x_train"],
                data_shapes["y_train"],
                self.placement.key,
            ),
            "eval": ("eval", *model, task, eval_block, self.placement.key),
        }

    # ------------------------------------------------------------------------------------ init

    def _init_one(self, seed, trial_id, hyperparameters):
        init_key, dropout_key, data_key = trial_keys(seed, trial_id)
        _, params, model_state = nnx.split(self._build(init_key), nnx.Param, ...)
        opt_state = make_optimizer(self.cohort.signature.optimizer, hyperparameters).init(params)
        return params, model_state, opt_state, dropout_key, data_key

    def _key(self, kind: str, width: int, quick: bool = False) -> tuple:
        return (*self._keys[kind], width, *(("quick",) if quick else ()))

    def _program(self, kind: str, width: int, lower, quick: bool = False) -> Any:
        if quick and jax.default_backend() != "cpu":
            raise ValueError(
                f"quick programs are compiled on a CPU backend only (this one is {jax.default_backend()!r})"
            )
        return compiled_program(self._key(kind, width, quick), lower, program_options(kind, quick))[0]

    def compile_seconds(self, kind: str, width: int, quick: bool = False) -> float | None:
        """Seconds the ``kind`` program at ``width`` took to compile (``None``: not compiled)."""
        entry = _PROGRAMS.get(self._key(kind, width, quick))
        return None if entry is None else entry[1]

    def is_compiled(self, kind: str, width: int, quick: bool = False) -> bool:
        """Whether the ``kind`` program at ``width`` (``quick``: its quick build) is in the
        process-wide table."""
        return self._key(kind, width, quick) in _PROGRAMS

    def compile_init(self):
        """The single-trial init program (no trial axis: it never depends on the cohort's size)."""
        hps = {k: np.float32(0) for k in OPTIMIZER_HYPERPARAMETERS}
        return self._program("init", 0, lambda: jax.jit(self._init_one).lower(np.int32(0), np.int32(0), hps))

    def init_rows(self, configs: Sequence[Any] | None = None) -> CohortState:
        """Initialises every trial from its own keys, one dispatch of the single-trial program per
        trial; returns host rows (leaves ``[K, ...]``) for :func:`chunk_rows`."""
        configs = list(configs if configs is not None else self.cohort.configs)
        program = self.compile_init()
        hps = hyperparameter_arrays(configs, self.schedule_steps)
        outs = [
            program(np.int32(c["seed"]), np.int32(c.trial_id), {k: v[i] for k, v in hps.items()})
            for i, c in enumerate(configs)
        ]
        params, model_state, opt_state, dropout_key, data_key = jax.tree.map(
            lambda *a: np.stack(a), *jax.device_get(outs)
        )
        k = len(configs)
        return CohortState(
            params,
            model_state,
            opt_state,
            dropout_key,
            data_key,
            step=np.zeros(k, np.int32),
            trial_id=np.asarray([c.trial_id for c in configs], np.int32),
            active=np.ones(k, bool),
            diverged_at=np.full(k, -1, np.int32),
        )

    def init(self, width: int | None = None, configs: Sequence[Any] | None = None) -> list[CohortState]:
        """Device chunks of every trial of the cohort (or ``configs``) at ``width`` (default: all)."""
        rows = self.init_rows(configs)
        return chunk_rows(rows, width or self.placement.round_width(len(rows.step)), self.placement)

    def abstract_rows(self, k: int) -> CohortState:
        """Shapes and dtypes of ``k`` host rows (restore targets), without computing anything."""
        hps = {n: jax.ShapeDtypeStruct((), jnp.float32) for n in OPTIMIZER_HYPERPARAMETERS}
        one = jax.eval_shape(
            self._init_one, jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32), hps
        )
        params, model_state, opt_state, dropout_key, data_key = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct((k, *a.shape), a.dtype), one
        )
        i32 = jax.ShapeDtypeStruct((k,), jnp.int32)
        return CohortState(
            params, model_state, opt_state, dropout_key, data_key, i32, i32, jax.ShapeDtypeStruct((k,), jnp.bool_), i32
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
        # Dropout masks from the trial's own key and step; no key work in programs without dropout.
        key = jax.random.fold_in(ts.dropout_key, ts.step) if self.cohort.signature.dropout > 0 else None
        x = augment_batch(self.cohort.signature.augment, x_all[idx], ts.data_key, ts.step)
        (loss, model_state), grads = jax.value_and_grad(self._loss, has_aux=True)(
            ts.params, ts.model_state, x, y_all[idx], key
        )
        # Decided before the update, from values the step has anyway: the loss, the gradients' global
        # norm (the one clipping computes; XLA merges the two) and the new batch statistics. Known
        # before the optimizer runs, the keep-or-freeze select fuses into the update itself: one pass
        # over parameters and optimizer state, as in a plain loop (a check of the new parameters
        # would cost two more passes, 3.6x slower per step on an MLP 1024x1024 at batch 32 on CPU).
        stats = sum((jnp.sum(leaf, dtype=jnp.float32) for leaf in jax.tree.leaves(model_state)), jnp.float32(0))
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads)) & jnp.isfinite(stats)
        ok = ts.active & finite
        tx = make_optimizer(self.cohort.signature.optimizer, ts.opt_state.hyperparams)
        updates, opt_state = tx.update(grads, ts.opt_state, ts.params)
        # Frozen parameters take a zero update: the select sits inside the update's own fusion. The
        # optimizer state of a frozen trial is not kept (it never trains again, and keeping it costs
        # a select pass over every moment: MLP 1024x1024, batch 32, CPU: 1.6x slower per step).
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

    def _train_impl(self, state: CohortState, num_steps, x_all, y_all):
        def rows(state, num_steps, x_all, y_all):  # one device's rows (all rows on one device)
            def run_trial(ts):
                def body(_, carry):
                    ts, loss_sum, count, last = carry
                    ts, loss, ok = self._trial_step(ts, x_all, y_all)
                    return ts, loss_sum + loss, count + ok, jnp.where(ok, loss, last)

                init = (ts, jnp.float32(0), jnp.int32(0), jnp.float32(jnp.nan))
                ts, loss_sum, count, last = jax.lax.fori_loop(0, num_steps, body, init)
                return ts, TrainMetrics(jnp.where(count > 0, loss_sum / jnp.maximum(count, 1), jnp.nan), last)

            if self.placement.size == 1:
                return _map_trials(run_trial, state)
            # A device whose rows are all inactive (padding, or diverged trials) skips the whole call:
            # padding costs no computation, and no energy, on its device.
            w = state.step.shape[0]
            idle = lambda s: (s, TrainMetrics(jnp.full(w, jnp.nan, jnp.float32), jnp.full(w, jnp.nan, jnp.float32)))
            return jax.lax.cond(jnp.any(state.active), lambda s: _map_trials(run_trial, s), idle, state)

        # Each device trains its own rows: no collective (the data set and num_steps are replicated).
        return self.placement.map_rows(rows, state, num_steps, x_all, y_all, replicated=3)

    def compile_train(self, chunk: CohortState, quick: bool = False):
        """The compiled training program for this chunk's width (compiled once per process;
        ``quick``: the quick build, CPU backends only, see :data:`QUICK_COMPILE`). The chunk's buffers
        are donated: a device holds one copy of its rows."""
        width = int(chunk.step.shape[0])
        return self._program(
            "train",
            width,
            lambda: jax.jit(self._train_impl, donate_argnums=0).lower(
                chunk, np.int32(1), self.data["x_train"], self.data["y_train"]
            ),
            quick,
        )

    def train(self, chunk: CohortState, num_steps: int, quick: bool = False) -> tuple[CohortState, TrainMetrics]:
        """Runs ``num_steps`` steps of every trial of one chunk in one dispatch (asynchronous: block
        on the outputs before reading clocks or energy counters), with the optimised or the
        ``quick`` program. ``chunk`` is donated: use the returned state, never the argument,
        afterwards."""
        return self.compile_train(chunk, quick)(chunk, np.int32(num_steps), self.data["x_train"], self.data["y_train"])

    def flops_per_trial_step(self, chunk: CohortState, quick: bool = False) -> float | None:
        """FLOPs of one training step of one trial, from XLA's cost analysis (``None`` where the
        backend reports none). XLA counts a loop body once, whatever its trip count: the program's
        figure covers one step of one device's rows of the chunk."""
        flops = compiled_flops(self.compile_train(chunk, quick))
        return None if flops is None else flops / self._rows_per_device(chunk)

    def _rows_per_device(self, chunk: CohortState) -> int:
        """Rows of ``chunk`` on each device: what a compiled (per-device) program's cost covers."""
        return max(1, int(chunk.step.shape[0]) // self.placement.size)

    # ------------------------------------------------------------------------------------ eval

    def _eval_impl(self, params, model_state, xs, ys, mask):
        """Per row: sums of the per-example loss, metric and squared metric over one masked block."""

        def rows(params, model_state, xs, ys, mask):  # one device's rows
            def run_trial(params, model_state):
                model = nnx.merge(self.graphdef, params, model_state, copy=True)

                def body(carry, chunk):
                    x, y, m = chunk
                    loss, metric = task_loss(self.task, model(x, train=False), y)
                    return (
                        carry[0] + (loss * m).sum(),
                        carry[1] + (metric * m).sum(),
                        carry[2] + (metric * metric * m).sum(),
                    ), None

                zero = jnp.float32(0)
                sums, _ = jax.lax.scan(body, (zero, zero, zero), (xs, ys, mask))
                return sums

            return _map_trials(run_trial, params, model_state)

        return self.placement.map_rows(rows, params, model_state, xs, ys, mask, replicated=3)

    def compile_eval(self, chunk: CohortState):
        width = int(chunk.step.shape[0])
        return self._program(
            "eval", width, lambda: jax.jit(self._eval_impl).lower(chunk.params, chunk.model_state, *self.data["val"][0])
        )

    def evaluate(self, chunk: CohortState, split: str = "val") -> EvalMetrics:
        """Loss, metric, score and the score's standard error of every row of one chunk on ``split``
        (``val`` or ``test``), as host arrays.

        The standard error is the sampling noise of the score over the split's ``n`` examples (see
        :mod:`sm2jax.tasks`): binomial, Laplace-smoothed, for a 0/1 metric such as accuracy (never 0,
        even at 100%); otherwise ``sqrt(Var[m] / n)`` of the per-example metric ``m``.
        """
        blocks = self.data.get(split)
        if blocks is None:
            raise ValueError(f"the data set {self.dataset.name!r} has no {split} split")
        program = self.compile_eval(chunk)
        outs = self.placement.host([program(chunk.params, chunk.model_state, *block) for block in blocks])
        loss_sum, metric_sum, sq_sum = (sum(np.asarray(o[i], np.float64) for o in outs) for i in range(3))
        n = self.data["counts"][split]
        task = get_task(self.task)
        loss, mean = loss_sum / n, metric_sum / n
        if task.binary:
            p = (metric_sum + 1.0) / (n + 2.0)
            se = np.sqrt(p * (1.0 - p) / n)
        else:
            se = np.sqrt(np.maximum(sq_sum / n - mean**2, 0.0) / n)
        return EvalMetrics(
            loss, np.asarray(task.reported(mean), np.float64), mean if task.higher_is_better else -mean, se
        )

    def forward_flops_per_example(self, chunk: CohortState) -> float | None:
        """FLOPs of one example's forward pass, from XLA's cost analysis of the evaluation program
        at this chunk's width (``None`` where the backend reports none); compiles nothing else. The
        program's figure covers one block of ``B`` validation examples per row of one device."""
        flops = compiled_flops(self.compile_eval(chunk))
        return None if flops is None else flops / (self._rows_per_device(chunk) * int(self.data["val"][0][0].shape[1]))

    # ------------------------------------------------------------------------------------ width

    def probe_width(
        self,
        chunks_by_width: dict[int, CohortState],
        *,
        steps: int | dict[int, int] = 5,
        repeats: int = 3,
        quick: bool = False,
    ) -> WidthProbe:
        """Measures samples/s of candidate widths on this hardware and keeps the fastest.

        ``chunks_by_width`` maps each candidate width to a chunk of that width (padding rows count
        no samples), whose programs are compiled and warmed first (compile time is not counted
        here). The candidates are then timed round-robin, ``repeats`` rounds of one call each
        (``steps`` steps, or ``steps[width]``), blocking on the outputs, and each keeps its best
        round (round-robin spreads the drift of a shared, noisy machine over all candidates).
        Results are discarded.
        """
        n = {w: steps[w] if isinstance(steps, dict) else steps for w in chunks_by_width}
        real = {
            w: int(np.sum(np.asarray(self.placement.host(c.trial_id)) != PADDING_ID))
            for w, c in chunks_by_width.items()
        }
        chunks = dict(chunks_by_width)  # each call donates its chunk: the next call trains the result
        for w in chunks:
            chunks[w] = jax.block_until_ready(self.train(chunks[w], n[w], quick))[0]  # compile and warm
        best = {w: np.inf for w in chunks}
        for _ in range(repeats):
            for w in chunks:
                t0 = time.perf_counter()
                chunks[w] = jax.block_until_ready(self.train(chunks[w], n[w], quick))[0]
                best[w] = min(best[w], time.perf_counter() - t0)
        # Samples of real rows only: a padded candidate (more devices than trials) gains nothing.
        rates = {w: real[w] * n[w] * self.batch_size / t for w, t in best.items()}
        return WidthProbe(rates, max(rates, key=rates.get), min(n.values()))


def _map_trials(fn, *trees):
    """``jax.vmap(fn)(*trees)``, except at width 1, where the trial axis is squeezed and restored: a
    one-wide batched matmul takes XLA's general batched-dot path, not the plain GEMM of a single
    trial (MLP 1024x1024, batch 32, CPU: 4x slower per step)."""
    if jax.tree.leaves(trees)[0].shape[0] != 1:
        return jax.vmap(fn)(*trees)
    out = fn(*jax.tree.map(lambda a: a[0], trees))
    return jax.tree.map(lambda a: a[None], out)


def compiled_memory_bytes(compiled) -> int | None:
    """Bytes a compiled program needs (arguments + outputs + temporaries), if XLA reports them."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def compiled_flops(compiled) -> float | None:
    """FLOPs of a compiled program from XLA's cost analysis, if reported."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])
