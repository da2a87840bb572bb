"""The hyperparameter vocabulary: every name a search space may use, and the optimizers.

This module owns the names. A hyperparameter is one of two kinds:

* **static**: it fixes the program or the array shapes (``model``, ``batch_size``, ``optimizer``,
  ``dtype``, ``augment``; ``dropout`` for a model that takes its rate at construction). Configurations
  that differ in one cannot share a ``vmap``: each value opens a cohort, compiled on its own.
* **traced**: a number carried per trial on the trial axis, in the optimizer state
  (``optax.inject_hyperparams``), and read inside the step: changing it never recompiles. The built-in
  ones are ``learning_rate``, ``weight_decay``, ``momentum``, ``b1``, ``b2``, ``warmup_fraction``,
  ``schedule``, ``max_grad_norm`` and ``dropout`` (the built-in models draw their masks with a traced
  keep probability); ``seed`` is traced too (it seeds the trial's keys).

Open to your own:

* :func:`register_optimizer` takes an optax factory (``optax.lion``, ``optax.adafactor``, your own
  chain); its float arguments become traced hyperparameters, so one cohort searches many values of
  each with one program. Gradient clipping and the learning-rate schedule wrap it as for the built-in
  ones (:func:`sm2jax.cohort.make_optimizer`).
* :func:`register_hyperparameter` declares a traced number of your own (a label smoothing, a loss
  weight) that your :class:`~sm2jax.tasks.Task` loss or your model takes by name.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import optax

from sm2jax.registry import Registry

STATIC = ("model", "batch_size", "optimizer", "dtype", "augment")
"""Hyperparameters that always fix the program or shapes (``dropout`` may too: see the module)."""

SCHEDULES = ("constant", "cosine", "linear")
COMMON_TRACED = ("warmup_fraction", "schedule_id", "max_grad_norm", "schedule_steps")
"""Traced values every optimizer state holds besides its own: the schedule and the clipping norm."""


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
    """A traced number: its default and the interval it must lie in.

    Attributes:
      name: how spaces and configurations call it.
      default: the value of configurations that do not set it.
      low, high: the admissible interval (``None``: unbounded on that side).
      open_low, open_high: whether the bound itself is excluded.
      infinite: whether ``+inf`` is admissible (``max_grad_norm``: never clip).
      doc: one line for the README's and the error messages' lists.
    """

    name: str
    default: float
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    infinite: bool = False
    doc: str = ""
    registered_by: str | None = dataclasses.field(default=None, compare=False)  # the module, for a resume

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not admissible (``None`` if it is)."""
        if isinstance(value, bool) or (not isinstance(value, (int, float)) and not hasattr(value, "__float__")):
            return "must be a number"
        value = float(value)
        if math.isnan(value):
            return "must not be NaN"
        if math.isinf(value) and not (self.infinite and value > 0):
            return "must be finite" + (" (inf is admissible only as the upper end)" if self.infinite else "")
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return f"must be {'>' if self.open_low else '>='} {self.low:g}"
        if self.high is not None and (value > self.high or (self.open_high and value == self.high)):
            return f"must be {'<' if self.open_high else '<='} {self.high:g}"
        return None


_BUILTIN_HYPERPARAMETERS = (
    Hyperparameter("learning_rate", 1e-3, 0.0, None, open_low=True, doc="peak learning rate"),
    Hyperparameter("weight_decay", 0.0, 0.0, None, doc="L2 (sgd) or decoupled (adamw) weight decay"),
    Hyperparameter("momentum", 0.9, 0.0, 1.0, open_high=True, doc="heavy-ball momentum (sgd)"),
    Hyperparameter("b1", 0.9, 0.0, 1.0, open_high=True, doc="first-moment decay (adam, adamw)"),
    Hyperparameter("b2", 0.999, 0.0, 1.0, open_high=True, doc="second-moment decay (adam, adamw)"),
    Hyperparameter("warmup_fraction", 0.0, 0.0, 1.0, doc="linear warm-up, as a fraction of the schedule"),
    Hyperparameter("max_grad_norm", math.inf, 0.0, None, open_low=True, infinite=True, doc="global-norm clip"),
    Hyperparameter("dropout", 0.0, 0.0, 1.0, open_high=True, doc="dropout rate (traced for the built-in models)"),
)
HYPERPARAMETERS: Registry[Hyperparameter] = Registry("hyperparameter", "sm2jax.register_hyperparameter")
"""Every traced hyperparameter by name (:mod:`sm2jax.registry`): the built-in ones, then those
declared, or registered with an optimizer."""
for _hp in _BUILTIN_HYPERPARAMETERS:
    HYPERPARAMETERS.register(_hp)
HYPERPARAMETERS.seal()

RESERVED = (*STATIC, "schedule", "seed", *COMMON_TRACED)


def register_hyperparameter(
    name: str, default: float, *, low: float | None = None, high: float | None = None, doc: str = ""
) -> Hyperparameter:
    """Declares a traced hyperparameter of your own, for your task's loss or your model.

    Its values live per trial in the optimizer state like the learning rate's, so a cohort searches
    many of them with one program. A :class:`~sm2jax.tasks.Task` that lists it in ``hyperparameters``
    gets it as a keyword argument of ``loss`` (a float32 scalar inside the vmapped step, the
    trial's own value); a model registered with it (:func:`sm2jax.register_model`) gets it as a
    keyword argument in training.

    Args:
      name: the name spaces use; it must not be a built-in one.
      default: the value of configurations whose space does not set it.
      low, high: inclusive bounds checked on every value a space gives (``None``: unbounded).
      doc: one line describing it.

    Example::

        sm2jax.register_hyperparameter("label_smoothing", 0.0, low=0.0, high=1.0)
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_hyperparameter: the name must be a Python identifier (got {name!r})")
    HYPERPARAMETERS.refuse_builtin(name)
    if name in RESERVED:
        raise ValueError(f"hyperparameter {name!r} is built in: register yours under another name")
    hp = Hyperparameter(name, float(default), low, high, doc=doc, registered_by=_caller())
    problem = hp.problem(default)
    if problem:
        raise ValueError(f"register_hyperparameter({name!r}): the default {problem} (got {default!r})")
    return HYPERPARAMETERS.register(hp)


# ---------------------------------------------------------------------------------- optimizers


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optax factory and its traced arguments.

    Attributes:
      name: how spaces call it (``{"optimizer": name}``).
      factory: ``factory(learning_rate=..., **traced) -> GradientTransformation``.
      defaults: the traced arguments besides ``learning_rate``, with this optimizer's defaults (a
        configuration of this optimizer that does not set one takes it from here).
      takes: the arguments of ``defaults`` the factory is called with (the built-in three carry all
        four of ``weight_decay``, ``momentum``, ``b1``, ``b2`` in their state and each takes its own).
    """

    name: str
    factory: Callable[..., optax.GradientTransformation]
    defaults: Mapping[str, float] = dataclasses.field(hash=False)  # a program key: hashed by the rest
    takes: tuple[str, ...] = ()
    registered_by: str | None = dataclasses.field(default=None, compare=False)  # the module, for a resume

    def core(self, learning_rate, hyperparameters: Mapping[str, Any]) -> optax.GradientTransformation:
        """The optimizer at peak ``learning_rate``, its other arguments from ``hyperparameters``."""
        return self.factory(learning_rate=learning_rate, **{n: hyperparameters[n] for n in self.takes})


def _sgd(learning_rate, weight_decay, momentum):
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum))


def _adam(learning_rate, b1, b2):
    return optax.adam(learning_rate, b1=b1, b2=b2)


def _adamw(learning_rate, b1, b2, weight_decay):
    return optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)


_LEGACY = {n: HYPERPARAMETERS[n].default for n in ("weight_decay", "momentum", "b1", "b2")}
BUILTIN_OPTIMIZERS = {
    "sgd": Optimizer("sgd", _sgd, _LEGACY, ("weight_decay", "momentum")),
    "adam": Optimizer("adam", _adam, _LEGACY, ("b1", "b2")),
    "adamw": Optimizer("adamw", _adamw, _LEGACY, ("b1", "b2", "weight_decay")),
}
"""``sgd``: coupled L2 weight decay and heavy-ball momentum (0 gives plain SGD); ``adam`` ignores
``weight_decay``; ``adamw``: decoupled weight decay (Loshchilov & Hutter 2019). Their states carry all
four numbers, whichever each takes, as they always have (checkpoints keep their layout)."""
OPTIMIZERS: Registry[Optimizer] = Registry("optimizer", "sm2jax.register_optimizer")
"""Every optimizer by name (:mod:`sm2jax.registry`): the built-in ones, then yours."""
for _optimizer in BUILTIN_OPTIMIZERS.values():
    OPTIMIZERS.register(_optimizer)
OPTIMIZERS.seal()


def register_optimizer(
    name: str,
    factory: Callable[..., optax.GradientTransformation],
    hyperparameters: Mapping[str, float] | None = None,
) -> Optimizer:
    """Makes an optax optimizer searchable as ``{"optimizer": name}``, its numbers traced.

    ``factory`` is called as ``factory(learning_rate=..., **hyperparameters)`` inside the vmapped
    step, with each value a float32 scalar: the trial's own. Every float argument with a default
    (``b1=0.9``) becomes a traced hyperparameter unless ``hyperparameters`` names them; arguments
    that are not numbers (``mu_dtype``, ``mask``, booleans) keep their defaults. The names join the
    vocabulary (:data:`HYPERPARAMETERS`): a name you share with another optimizer (``weight_decay``)
    is one hyperparameter, and a configuration of this optimizer that does not set it takes this
    optimizer's default.

    Like the built-in ones, the optimizer runs at the peak learning rate inside a chain of global-norm
    clipping (``max_grad_norm``) and the unit-peak schedule (``schedule``, ``warmup_fraction``).

    Args:
      name: the name spaces use; built-in names cannot be replaced (registering yours again
        replaces it: the factory is part of every program's key).
      factory: returns an ``optax.GradientTransformation``; it must take ``learning_rate``.
      hyperparameters: the traced arguments and their defaults (default: the factory's float ones).

    Example::

        sm2jax.register_optimizer("lion", optax.lion)   # traces b1, b2 and weight_decay
        space = sm2jax.SearchSpace({"optimizer": "lion", "b1": sm2jax.Uniform(0.85, 0.95),
                                    "weight_decay": sm2jax.LogUniform(1e-4, 1e-1)})
    """
    OPTIMIZERS.refuse_builtin(name)
    if not callable(factory):
        raise TypeError(f"register_optimizer({name!r}, ...): the factory must be callable")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        raise TypeError(f"register_optimizer({name!r}, ...): cannot read the factory's arguments") from None
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "learning_rate" not in params and not takes_any:
        raise ValueError(f"register_optimizer({name!r}, ...): the factory must take a learning_rate argument")
    if hyperparameters is None:
        hyperparameters = {
            n: float(p.default)
            for n, p in params.items()
            if n != "learning_rate" and isinstance(p.default, float) and not math.isnan(p.default)
        }
    hyperparameters = {n: float(v) for n, v in hyperparameters.items()}
    for n, default in hyperparameters.items():
        if n not in params and not takes_any:
            raise ValueError(f"register_optimizer({name!r}, ...): the factory has no argument {n!r}")
        if n in RESERVED or n == "learning_rate":
            raise ValueError(f"register_optimizer({name!r}, ...): {n!r} is not an optimizer argument sm2jax can trace")
        known = HYPERPARAMETERS.get(n)
        problem = (known or Hyperparameter(n, default)).problem(default)
        if problem:
            raise ValueError(f"register_optimizer({name!r}, ...): the default of {n!r} {problem} (got {default!r})")
        if known is None:
            HYPERPARAMETERS.register(
                Hyperparameter(n, default, doc=f"argument of optimizer {name!r}", registered_by=_caller())
            )
    return OPTIMIZERS.register(Optimizer(name, factory, hyperparameters, tuple(hyperparameters), _caller()))


def get_optimizer(name: str) -> Optimizer:
    """The optimizer registered as ``name`` (one-line error naming the known ones otherwise)."""
    return OPTIMIZERS.get(name)


def optimizer_defaults(name: str) -> dict[str, float]:
    """The traced arguments of optimizer ``name`` with its defaults (empty for an unknown name)."""
    return dict(OPTIMIZERS[name].defaults) if name in OPTIMIZERS else {}


def default_of(name: str, optimizer: str | None = None) -> float:
    """The value a configuration of ``optimizer`` takes for traced ``name`` when its space is silent."""
    if optimizer is not None and name in optimizer_defaults(optimizer):
        return OPTIMIZERS[optimizer].defaults[name]
    if name not in HYPERPARAMETERS:
        raise ValueError(
            f"unknown hyperparameter {name!r}: declare it with sm2jax.register_hyperparameter({name!r}, default)"
        )
    return HYPERPARAMETERS[name].default


def _caller() -> str | None:
    """The module that called the public function calling this (``None`` if unknown)."""
    frame = sys._getframe(2)
    return frame.f_globals.get("__name__") if frame is not None else None


def registering_modules(optimizers, hyperparameters) -> set[str]:
    """The modules that registered the optimizers and hyperparameters named (built-in ones need none)."""
    found = {OPTIMIZERS[n].registered_by for n in optimizers if n in OPTIMIZERS and n not in OPTIMIZERS.builtin()}
    found |= {HYPERPARAMETERS[n].registered_by for n in hyperparameters if n in HYPERPARAMETERS}
    return {m for m in found if m}
