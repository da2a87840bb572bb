"""Cohorts: configurations that share a static signature, trained together on a trial axis.

Two configurations can share one ``jax.vmap`` only if they have the same array shapes and the same
program: same model spec, batch size, optimizer and dtype (and dropout rate, for a model that takes
it static: the built-in ones take it traced). Everything else is a number, stacked on a leading trial axis and carried in the optimizer state through
``optax.inject_hyperparams`` so that changing it never recompiles.

The per-trial learning rate follows

.. math::  \\eta_t = \\eta_{\\text{peak}} \\cdot w_t \\cdot d_t,

with linear warm-up :math:`w_t = \\min(1, t/(f_w T))` over a fraction :math:`f_w` of the
schedule length :math:`T`, and decay :math:`d_t \\in \\{1,\\ \\tfrac12(1+\\cos \\pi p_t),\\ 1-p_t\\}`
(constant, cosine, linear) of the post-warm-up progress :math:`p_t \\in [0, 1]`. The schedule has unit
peak and is multiplied by the traced peak: optax schedules cannot take a traced peak value. It equals
``optax.warmup_cosine_decay_schedule(0, peak, f_w T, T)`` step for step (warm-up from 0 at step 0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sm2jax.space import Config
from sm2jax.vocabulary import COMMON_TRACED, SCHEDULES, Optimizer, default_of, get_optimizer

TRACED_DROPOUT = "traced"
"""``Signature.dropout`` of a cohort whose rates are traced (its configurations' own, per trial)."""


@dataclasses.dataclass(frozen=True)
class Signature:
    """The static part of a configuration: what fixes shapes and the compiled program."""

    model: str  # canonical JSON of the model spec
    batch_size: int
    optimizer: str
    dropout: float | str  # a static rate, or TRACED_DROPOUT (masks drawn, rates per trial)
    dtype: str
    augment: str = "none"  # training-batch augmentation (sm2jax.space.AUGMENTATIONS), traced per trial

    @classmethod
    def of(cls, config: Config) -> Signature:
        return cls(
            json.dumps(config["model"], sort_keys=True),
            config["batch_size"],
            config["optimizer"],
            config["dropout"],
            config["dtype"],
            config.values.get("augment", "none"),
        )

    @property
    def model_spec(self) -> dict[str, Any]:
        return json.loads(self.model)

    @property
    def static_dropout(self) -> float:
        """The rate the model is built with: 0 where the rates are traced."""
        return 0.0 if self.dropout == TRACED_DROPOUT else float(self.dropout)

    @property
    def draws_masks(self) -> bool:
        """Whether training draws dropout masks (a static rate above 0, or traced rates)."""
        return self.dropout == TRACED_DROPOUT or self.dropout > 0

    def describe(self) -> str:
        spec = self.model_spec
        opts = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
        model = f"{spec['name']}({opts})" if opts else spec["name"]
        aug = "" if self.augment == "none" else f" augment={self.augment}"
        return f"{model} bs={self.batch_size} {self.optimizer} dropout={_rate(self.dropout)} {self.dtype}{aug}"


@dataclasses.dataclass(frozen=True)
class CohortSpec:
    """A static signature and the configurations (trials) that share it, in trial order."""

    signature: Signature
    configs: tuple[Config, ...]

    @property
    def size(self) -> int:
        """The number of configurations (not a vmap width: that is the runner's choice)."""
        return len(self.configs)

    @property
    def name(self) -> str:
        """A readable name plus a short hash of the whole static signature, so two cohorts that differ
        only in model options (hidden sizes, depth...) never share a name: progress, checkpoints and
        restore are keyed by it."""
        s = self.signature
        fields = dataclasses.asdict(s)
        if s.augment == "none":  # names of cohorts without augmentation stay what they were before it existed
            del fields["augment"]
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
        aug = "" if s.augment == "none" else f"-{s.augment}"
        return f"{s.model_spec['name']}-bs{s.batch_size}-{s.optimizer}-d{_rate(s.dropout)}-{s.dtype}{aug}-{digest}"


class CohortError(RuntimeError):
    """Compiling, training or evaluating a cohort raised (a user's model, loss or optimizer, most
    often): the message names the cohort, its configurations and the phase, then the error itself,
    which is chained as ``__cause__`` (``sm2jax --debug`` shows its traceback)."""

    @classmethod
    def of(cls, cohort: CohortSpec, phase: str, err: BaseException) -> CohortError:
        ids = [c.trial_id for c in cohort.configs]
        shown = ", ".join(map(str, ids[:8])) + (f", ... ({len(ids)} in all)" if len(ids) > 8 else "")
        model = json.dumps(cohort.signature.model_spec, sort_keys=True)
        first = str(err).splitlines()[0] if str(err) else ""
        return cls(
            f"cohort {cohort.name} failed in phase {phase} (trials {shown}; model {model}; trial {ids[0]}: {cohort.configs[0].describe()}): {type(err).__name__}: {first}"
        )


@contextlib.contextmanager
def blame(cohort: CohortSpec, phase: str) -> Iterator[None]:
    """Re-raises an error of the block as a :class:`CohortError` naming ``cohort`` and ``phase``
    (``KeyboardInterrupt`` and errors already naming a cohort pass as they are)."""
    try:
        yield
    except CohortError:
        raise
    except Exception as err:
        raise CohortError.of(cohort, phase, err) from err


def _rate(dropout: float | str) -> str:
    return dropout if isinstance(dropout, str) else f"{dropout:g}"


def group_into_cohorts(configs: Sequence[Config]) -> list[CohortSpec]:
    """Groups configurations by static signature; cohorts and trials keep first-seen order.

    A model that takes its dropout rate traced (:func:`sm2jax.models.traced_dropout`) puts every
    rate of an otherwise equal signature into one cohort that draws masks (rate 0 among them keeps
    every element); where all its configurations' rates are 0 the cohort draws none.
    """
    from sm2jax.models import traced_dropout

    if not configs:
        raise ValueError("no configurations to group")
    signatures = [Signature.of(c) for c in configs]
    masked = {dataclasses.replace(s, dropout=TRACED_DROPOUT) for s in signatures if s.dropout > 0}
    groups: dict[Signature, list[Config]] = {}
    for config, sig in zip(configs, signatures):
        if traced_dropout(sig.model_spec["name"]):
            traced = dataclasses.replace(sig, dropout=TRACED_DROPOUT)
            sig = traced if traced in masked else dataclasses.replace(sig, dropout=0.0)
        groups.setdefault(sig, []).append(config)
    cohorts = [CohortSpec(sig, tuple(cs)) for sig, cs in groups.items()]
    names = [c.name for c in cohorts]
    if len(set(names)) != len(names):  # a hash collision: never let two cohorts share their state
        raise RuntimeError(f"cohort names collide: {sorted(n for n in names if names.count(n) > 1)}")
    return cohorts


def traced_names(signature: Signature, task_hyperparameters: Sequence[str] = ()) -> tuple[str, ...]:
    """The traced hyperparameters a cohort's optimizer state carries, in a fixed order: the
    learning rate, the optimizer's own arguments, the schedule and clipping norm, then the ones its
    model takes in training (a traced dropout rate among them) and its task's loss takes."""
    names = ["learning_rate", *get_optimizer(signature.optimizer).defaults, *COMMON_TRACED]
    names += model_names(signature)
    names += [n for n in task_hyperparameters if n not in names]
    return tuple(names)


def unused_names(
    configs: Sequence[Config], names: Sequence[str], task_hyperparameters: Sequence[str] = ()
) -> dict[str, str]:
    """Of ``names`` (a space's), those no configuration uses -- not a static setting, the seed, nor
    a traced value its optimizer, schedule, model or task takes -- each with what would use it."""
    from sm2jax.models import MODELS, model_hyperparameters
    from sm2jax.vocabulary import OPTIMIZERS

    used = {*(f.name for f in dataclasses.fields(Signature)), "seed", "schedule", "learning_rate", *COMMON_TRACED}
    used |= set(task_hyperparameters)
    for sig in {Signature.of(c) for c in configs}:  # what the optimizer is called with, not its state's layout
        used |= {*get_optimizer(sig.optimizer).takes, *model_hyperparameters(sig.model_spec["name"])}
    out = {}
    for name in (n for n in names if n not in used):
        takers = [f"optimizer {o}" for o, opt in sorted(OPTIMIZERS.items()) if name in opt.takes]
        takers += [f"model {m}" for m, model in sorted(MODELS.items()) if name in model.hyperparameters]
        out[name] = " or ".join(takers) or "a task or model registered with it in hyperparameters=(...)"
    return out


def check_every_name_is_used(configs: Sequence[Config], names: Sequence[str], task: Any) -> None:
    """One line for a searched hyperparameter (of ``names``) that no configuration uses -- it would
    be recorded, and selected, while changing nothing -- naming it and what would use it."""
    unused = unused_names(configs, names, task.hyperparameters)
    if unused:
        name, takers = next(iter(unused.items()))
        optimizers = sorted({c["optimizer"] for c in configs})
        raise ValueError(
            f"space: {name!r} is searched but no configuration uses it (optimizer {', '.join(optimizers)}, task {task.name!r}): remove it, or search with what uses it ({takers})"
        )


def model_names(signature: Signature) -> tuple[str, ...]:
    """The traced hyperparameters the cohort's model is called with in training (``dropout`` only
    where the cohort draws masks with traced rates)."""
    from sm2jax.models import model_hyperparameters

    names = model_hyperparameters(signature.model_spec["name"])
    return tuple(n for n in names if n != "dropout" or signature.dropout == TRACED_DROPOUT)


def hyperparameter_arrays(
    configs: Sequence[Config], schedule_steps: int, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """The traced hyperparameters ``names`` as ``float32[K]`` arrays (trial axis first); a value a
    configuration does not set is its optimizer's default, else the vocabulary's."""
    rows = {name: [] for name in names}
    for c in configs:
        for name in names:
            if name == "schedule_id":
                value = SCHEDULES.index(c["schedule"])
            elif name == "schedule_steps":
                value = schedule_steps
            elif name in c.values:
                value = c[name]
            else:
                value = default_of(name, c["optimizer"])
            rows[name].append(value)
    return {name: np.asarray(v, dtype=np.float32) for name, v in rows.items()}


def unit_schedule(count, warmup_fraction, schedule_id, schedule_steps):
    """The unit-peak learning-rate multiplier :math:`w_t d_t` (see the module docstring)."""
    t = count.astype(jnp.float32)
    warm = warmup_fraction * schedule_steps
    warm_factor = jnp.where(warm > 0, jnp.minimum(t / jnp.maximum(warm, 1.0), 1.0), 1.0)
    progress = jnp.clip((t - warm) / jnp.maximum(schedule_steps - warm, 1.0), 0.0, 1.0)
    decay = jnp.select(
        [schedule_id == SCHEDULES.index("cosine"), schedule_id == SCHEDULES.index("linear")],
        [0.5 * (1.0 + jnp.cos(jnp.pi * progress)), 1.0 - progress],
        1.0,
    )
    return warm_factor * decay


def clip_by_global_norm(max_norm) -> optax.GradientTransformation:
    r"""Clips updates to global norm ``max_norm``: :math:`g \cdot \min(1, c / \lVert g \rVert_2)`.

    The same maths as ``optax.clip_by_global_norm`` (Pascanu et al., 2013), written as one scalar
    factor times the updates rather than a per-element divide: XLA then fuses the factor into each
    consumer of the gradient (the moment updates of Adam) instead of materialising the clipped
    gradient, one pass fewer over every parameter per step. Unclipped updates are bit-identical (a factor of exactly 1); clipped ones differ from
    optax's by float rounding. ``max_norm = inf`` never clips. Traced inside the vmapped update, so
    the norm is per trial.
    """

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _scale_by_unit_schedule(warmup_fraction, schedule_id, schedule_steps) -> optax.GradientTransformation:
    return optax.scale_by_schedule(lambda count: unit_schedule(count, warmup_fraction, schedule_id, schedule_steps))


def optimizer_factory(optimizer: Optimizer | str, names: Sequence[str]):
    """Returns ``f(**hyperparameters) -> GradientTransformation`` for ``optax.inject_hyperparams``,
    taking every name of ``names`` (the cohort's traced hyperparameters: :func:`traced_names`).

    The chain is: clip by global norm (per trial, because it runs inside the vmapped update) ->
    the registered optimizer (:mod:`sm2jax.vocabulary`) at the peak learning rate, given its own
    arguments -> the unit-peak schedule. The other names (a dropout rate, a loss weight) only ride
    along in the state, where the step reads them.
    """
    optimizer = get_optimizer(optimizer) if isinstance(optimizer, str) else optimizer

    def make(**hps):
        return optax.chain(
            clip_by_global_norm(hps["max_grad_norm"]),
            optimizer.core(hps["learning_rate"], hps),
            _scale_by_unit_schedule(hps["warmup_fraction"], hps["schedule_id"], hps["schedule_steps"]),
        )

    # inject_hyperparams binds its arguments to the factory's signature: name them.
    make.__signature__ = inspect.Signature([inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names])
    return make


def make_optimizer(optimizer: Optimizer | str, hyperparameters: dict[str, Any]) -> optax.GradientTransformation:
    """The injected optimizer for one trial (a registered one, or its name); its hyperparameters,
    every traced one of its cohort, live in its state."""
    return optax.inject_hyperparams(optimizer_factory(optimizer, tuple(hyperparameters)))(**hyperparameters)
