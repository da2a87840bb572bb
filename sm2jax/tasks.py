r"""Tasks: what a model's outputs are scored by -- the training loss, the validation metric, and
which direction of the metric is better.

A :class:`Task` gives two per-example functions, both traced inside the jitted programs:

* ``loss(outputs, targets) -> float32[B]``: minimised in training (its batch mean);
* ``metric(outputs, targets) -> float32[B]``: averaged over a split to score a configuration.

Over a split of :math:`n` examples with per-example metric :math:`m_i`, the reported metric is
``report(mean)`` of :math:`\bar m = \frac1n \sum_i m_i` (e.g. perplexity :math:`e^{\bar m}` for a
language model), and the score the scheduler maximises is :math:`\bar m` if ``higher_is_better``
else :math:`-\bar m`. Its standard error is the split's sampling noise: for a 0/1 metric
(``binary=True``, e.g. accuracy) the Laplace-smoothed binomial
:math:`\sqrt{\tilde p (1-\tilde p)/n}`, :math:`\tilde p = (\sum_i m_i + 1)/(n + 2)` (never 0, even at
100%); otherwise :math:`\sqrt{\widehat{\mathrm{Var}}[m]/n}`.

Built in: ``classification`` (softmax cross-entropy, accuracy), ``regression`` (mean squared error
over the target's last axis), ``language_model`` (per-token cross-entropy, perplexity). Register your
own with :func:`register_task`; a data set names its task (``ArrayDataset.task``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sm2jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class Task:
    """A loss, a metric and the metric's direction.

    Attributes:
      name: the name data sets use (``ArrayDataset.task``).
      loss: ``(outputs, targets) -> float32[B]``, per-example training loss.
      metric: ``(outputs, targets) -> float32[B]``, per-example validation metric.
      metric_name: how reports call the metric (e.g. ``"accuracy"``).
      higher_is_better: the metric's direction (the score is ``-mean`` when ``False``).
      binary: the per-example metric is 0 or 1 (binomial standard error).
      majority_chance: targets are class labels, so "not learned" means "not clearly above always
        guessing the majority class" at exploration (otherwise: not clearly above the start).
      report: maps the split's mean metric (a host float or numpy array) to the reported one
        (default: the mean itself).
      hyperparameters: traced hyperparameters ``loss`` takes as keyword arguments (declared with
        :func:`sm2jax.register_hyperparameter`): in training each is the trial's own value, a
        float32 scalar inside the vmapped step, so values share one program; the validation loss
        is computed at their defaults (the metric never takes them).
    """

    name: str
    loss: Callable[[jax.Array, jax.Array], jax.Array]
    metric: Callable[[jax.Array, jax.Array], jax.Array]
    metric_name: str
    higher_is_better: bool
    binary: bool = False
    majority_chance: bool = False
    report: Callable[[float], float] | None = None
    hyperparameters: tuple[str, ...] = ()

    def reported(self, mean):
        return mean if self.report is None else self.report(mean)


def _cross_entropy(outputs, targets):
    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets)


def _accuracy(outputs, targets):
    return (jnp.argmax(outputs, -1) == targets).astype(jnp.float32)


def _squared_error(outputs, targets):
    return jnp.mean((outputs - targets) ** 2, axis=-1)


def _token_cross_entropy(outputs, targets):
    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets).mean(-1)


BUILTIN_TASKS = {
    "classification": Task(
        "classification", _cross_entropy, _accuracy, "accuracy", True, binary=True, majority_chance=True
    ),
    "regression": Task("regression", _squared_error, _squared_error, "mse", False),
    "language_model": Task(
        "language_model", _token_cross_entropy, _token_cross_entropy, "perplexity", False, report=np.exp
    ),
}
TASKS: Registry[Task] = Registry("task", "sm2jax.register_task")
"""Every task by name (:mod:`sm2jax.registry`): the built-in ones, then yours."""
for _task in BUILTIN_TASKS.values():
    TASKS.register(_task)
TASKS.seal()


def register_task(task: Task) -> Task:
    """Makes ``task`` available by its name to data sets and studies in this process.

    Registering a name again replaces the earlier task (a re-run notebook cell); the task is part
    of every training and evaluation program's key, so programs compiled for the earlier one are
    reused only when its loss and metric are the same functions. Built-in names cannot be replaced.

    Example::

        import jax, jax.numpy as jnp, optax, sm2jax

        sm2jax.register_hyperparameter("label_smoothing", 0.0, low=0.0, high=1.0)

        def smoothed(out, y, label_smoothing):  # the trial's own smoothing, traced
            labels = optax.smooth_labels(jax.nn.one_hot(y, out.shape[-1]), label_smoothing)
            return optax.softmax_cross_entropy(out, labels)

        sm2jax.register_task(sm2jax.Task(
            "smoothed_classification", loss=smoothed,
            metric=lambda out, y: (out.argmax(-1) == y).astype(jnp.float32),
            metric_name="accuracy", higher_is_better=True, binary=True, majority_chance=True,
            hyperparameters=("label_smoothing",)))
    """
    if not isinstance(task, Task):
        raise TypeError(f"register_task takes a sm2jax.Task, not {type(task).__name__}")
    TASKS.refuse_builtin(task.name)
    from sm2jax.vocabulary import HYPERPARAMETERS

    unknown = [h for h in task.hyperparameters if h not in HYPERPARAMETERS]
    if unknown:
        raise ValueError(
            f"task {task.name!r}: unknown hyperparameters {unknown}: declare them first with sm2jax.register_hyperparameter"
        )
    task = dataclasses.replace(task, hyperparameters=tuple(task.hyperparameters))
    return TASKS.register(task)


def get_task(name: str) -> Task:
    """The task registered as ``name`` (one-line error naming the known ones otherwise)."""
    return TASKS.get(name)
