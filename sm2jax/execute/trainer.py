"""A cohort's programs: one trial's init, and W-wide training and evaluation chunks.

Compile once. A compiled program depends on the cohort's static settings and a vmap *width* W,
never on how many trials are alive (see :mod:`sm2jax.execute.rows` for chunks, :mod:`sm2jax.execute.steps` for the
maths and :mod:`sm2jax.execute.programs` for the table of compiled programs). One call of
:meth:`CohortTrainer.train` runs ``num_steps`` steps of one chunk in a single dispatch.

Devices. A chunk is sharded over the ``trials`` axis of the trainer's
:class:`~sm2jax.execute.placement.Placement` (``jax.shard_map``): each device runs the vmapped loop on its
own ``W / n`` rows, with no collective; the data set is replicated. Training donates the chunk's
buffers: a device holds one copy of its rows.

Quick programs. On a CPU backend the training program can also be compiled *quick*
(:data:`sm2jax.execute.programs.QUICK_COMPILE`); :class:`sm2jax.execute.runner.CohortRunner` decides when.

Which width is fastest depends on model size and hardware; :meth:`CohortTrainer.probe_width`
measures it, and :mod:`sm2jax.execute.width_policy` decides when measuring pays for its compilation.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Float

from sm2jax.cohort import CohortSpec, hyperparameter_arrays, model_names, traced_names
from sm2jax.data import ArrayDataset
from sm2jax.execute.batches import EVAL_BATCH_SIZE, device_put_dataset, steps_per_epoch
from sm2jax.execute.placement import Placement, default_placement
from sm2jax.execute.programs import Program, compiled_flops, program_options, signature
from sm2jax.execute.rows import PADDING_ID, CohortState, chunk_rows
from sm2jax.execute.steps import EvalSettings, InitSettings, TrainSettings, eval_chunk, init_trial, train_chunk
from sm2jax.models import model_builder
from sm2jax.tasks import get_task
from sm2jax.vocabulary import get_optimizer


class EvalMetrics(NamedTuple):
    """Host (numpy) arrays over a chunk's rows; NaN for a diverged row."""

    loss: Float[np.ndarray, " W"]
    metric: Float[np.ndarray, " W"]  # the task's reported metric (accuracy, mse, perplexity...)
    score: Float[np.ndarray, " W"]  # higher is better: the mean metric, negated when lower is better
    score_se: Float[np.ndarray, " W"]  # standard error of the score from the split's sampling noise


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


_SCALAR = jax.ShapeDtypeStruct((), jnp.int32)  # a seed, a trial id, a train call's step count


def init_arguments(names: Sequence[str]) -> tuple:
    """Abstract arguments of the single-trial init program, for traced hyperparameters ``names``."""
    return (_SCALAR, _SCALAR, {n: jax.ShapeDtypeStruct((), jnp.float32) for n in names})


def init_settings(signature: Any, input_shape: Sequence[int], num_outputs: int) -> InitSettings:
    """What a cohort of ``signature`` initialises a trial from, for examples of ``input_shape``."""
    return InitSettings(
        model_builder(signature.model_spec["name"]),
        signature.model,
        tuple(input_shape),
        int(num_outputs),
        signature.dtype,
        get_optimizer(signature.optimizer),
    )


def abstract_model(settings: InitSettings, dropout: float = 0.0) -> nnx.Module:
    """The cohort's model as shapes only (nothing initialised), built at ``dropout``: the graph its
    programs merge parameters into (evaluation builds it at 0)."""
    return nnx.eval_shape(lambda: settings.build(jax.random.PRNGKey(0), dropout))


@functools.lru_cache(maxsize=64)
def _trial_shapes(settings: InitSettings, hyperparameter_names: tuple[str, ...]) -> Any:
    """Shapes and dtypes of one trial's init outputs (traced once per settings)."""
    return jax.eval_shape(functools.partial(init_trial, settings), *init_arguments(hyperparameter_names))


def abstract_rows(settings: InitSettings, hyperparameter_names: Sequence[str], k: int) -> CohortState:
    """Shapes and dtypes of ``k`` host rows of a cohort (restore targets), traced once and
    computing nothing."""
    one = _trial_shapes(settings, tuple(hyperparameter_names))
    params, model_state, opt_state, dropout_key, data_key = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct((k, *a.shape), a.dtype), one
    )
    i32k = jax.ShapeDtypeStruct((k,), jnp.int32)
    return CohortState(
        params, model_state, opt_state, dropout_key, data_key, i32k, i32k, jax.ShapeDtypeStruct((k,), jnp.bool_), i32k
    )


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
        eval_batch_size: int = EVAL_BATCH_SIZE,
        device_data: dict[str, jax.Array] | None = None,
        placement: Placement | None = None,
    ):
        sig = cohort.signature
        self.cohort = cohort
        self.dataset = dataset
        self.task = get_task(dataset.task)
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
        optimizer = get_optimizer(sig.optimizer)
        self.hyperparameter_names = traced_names(sig, self.task.hyperparameters)
        self.init_settings = init_settings(sig, dataset.input_shape, dataset.num_outputs)

        def graph(dropout: float):
            return nnx.split(abstract_model(self.init_settings, dropout), nnx.Param, ...)[0]

        self.graphdef = graph(sig.static_dropout)
        self.eval_settings = EvalSettings(graph(0.0), self.task, self.placement)
        self.train_settings = TrainSettings(
            self.graphdef,
            self.task,
            optimizer,
            sig.batch_size,
            self.num_train,
            sig.draws_masks,
            model_names(sig),
            sig.augment,
            self.placement,
        )
        self._signatures: dict[tuple[str, int], Any] = {}

    # ---------------------------------------------------------------------------------- programs

    def program(self, kind: str, width: int, quick: bool = False) -> Program:
        """The key of the ``kind`` program (``init``, ``train``, ``eval``) at ``width`` (``quick``:
        the quick training build): its step function, settings, argument shapes and XLA options."""
        if (kind, width) not in self._signatures:
            self._signatures[kind, width] = signature(self._arguments(kind, width))
        sig = self._signatures[kind, width]
        if kind == "init":
            return Program(init_trial, self.init_settings, sig, program_options("init"))
        if kind == "train":
            return Program(train_chunk, self.train_settings, sig, program_options("train", quick), donate=(0,))
        return Program(eval_chunk, self.eval_settings, sig, program_options("eval"))

    def _arguments(self, kind: str, width: int) -> tuple:
        """Abstract arguments of the ``kind`` program at ``width`` (shapes and dtypes only)."""
        if kind == "init":
            return init_arguments(self.hyperparameter_names)
        rows = self.abstract_rows(width)
        if kind == "train":
            return (rows, _SCALAR, self.data["x_train"], self.data["y_train"])
        return (rows.params, rows.model_state, *self.data["val"][0])

    def compile_seconds(self, kind: str, width: int, quick: bool = False) -> float | None:
        """Seconds the ``kind`` program at ``width`` took to compile (``None``: not compiled)."""
        return self.program(kind, width, quick).compile_seconds

    def is_compiled(self, kind: str, width: int, quick: bool = False) -> bool:
        """Whether the ``kind`` program at ``width`` (``quick``: its quick build) is compiled."""
        return self.program(kind, width, quick).is_compiled

    def compile_init(self):
        """The single-trial init program (no trial axis: it never depends on the cohort's size)."""
        hps = {k: np.float32(0) for k in self.hyperparameter_names}
        return self.program("init", 0).compile(np.int32(0), np.int32(0), hps)

    def init_rows(self, configs: Sequence[Any] | None = None) -> CohortState:
        """Initialises every trial from its own keys, one dispatch of the single-trial program per
        trial; returns host rows (leaves ``[K, ...]``) for :func:`chunk_rows`."""
        configs = list(configs if configs is not None else self.cohort.configs)
        program = self.compile_init()
        hps = hyperparameter_arrays(configs, self.schedule_steps, self.hyperparameter_names)
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
        return abstract_rows(self.init_settings, self.hyperparameter_names, k)

    def abstract_chunk(self, width: int) -> CohortState:
        """Shapes, dtypes and shardings of a ``width``-wide chunk: what its programs are compiled
        for, without initialising a trial."""
        rows = self.abstract_rows(width)
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.placement.rows), rows)

    # ------------------------------------------------------------------------------------ train

    def compile_train(self, chunk: CohortState, quick: bool = False):
        """The compiled training program for this chunk's width (compiled once per process;
        ``quick``: the quick build, CPU backends only). The chunk's buffers are donated: a device
        holds one copy of its rows."""
        program = self.program("train", int(chunk.step.shape[0]), quick)
        return program.compile(chunk, np.int32(1), self.data["x_train"], self.data["y_train"])

    def train(self, chunk: CohortState, num_steps: int, quick: bool = False):
        """Runs ``num_steps`` steps of every trial of one chunk in one dispatch (asynchronous: block
        on the outputs before reading clocks or energy counters), with the optimised or the
        ``quick`` program; returns ``(state, TrainMetrics)``. ``chunk`` is donated: use the
        returned state, never the argument, afterwards."""
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

    def compile_eval(self, chunk: CohortState):
        program = self.program("eval", int(chunk.step.shape[0]))
        return program.compile(chunk.params, chunk.model_state, *self.data["val"][0])

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
        task = self.task
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
