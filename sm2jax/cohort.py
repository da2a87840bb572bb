"""Cohorts: configurations that share a static signature, trained together on a trial axis.

Two configurations can share one ``jax.vmap`` only if they have the same array shapes and the same
program: same model spec, batch size, optimizer family, dropout rate and dtype. Everything else is a
number, stacked on a leading trial axis and carried in the optimizer state through
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

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sm2jax.space import OPTIMIZERS, SCHEDULES, Config

# Order of the traced, per-trial optimizer hyperparameters in the optimizer state.
OPTIMIZER_HYPERPARAMETERS = (
    "learning_rate",
    "weight_decay",
    "momentum",
    "b1",
    "b2",
    "warmup_fraction",
    "schedule_id",
    "max_grad_norm",
    "schedule_steps",
)


@dataclasses.dataclass(frozen=True)
class Signature:
    """The static part of a configuration: what fixes shapes and the compiled program."""

    model: str  # canonical JSON of the model spec
    batch_size: int
    optimizer: str
    dropout: float
    dtype: str
    augment: str = "none"  # training-batch augmentation (sm2jax.data.AUGMENTATIONS), traced per trial

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

    def describe(self) -> str:
        spec = self.model_spec
        opts = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
        model = f"{spec['name']}({opts})" if opts else spec["name"]
        aug = "" if self.augment == "none" else f" augment={self.augment}"
        return f"{model} bs={self.batch_size} {self.optimizer} dropout={self.dropout:g} {self.dtype}{aug}"


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
        return f"{s.model_spec['name']}-bs{s.batch_size}-{s.optimizer}-d{s.dropout:g}-{s.dtype}{aug}-{digest}"


def group_into_cohorts(configs: Sequence[Config]) -> list[CohortSpec]:
    """Groups configurations by static signature; cohorts and trials keep first-seen order."""
    if not configs:
        raise ValueError("no configurations to group")
    groups: dict[Signature, list[Config]] = {}
    for config in configs:
        groups.setdefault(Signature.of(config), []).append(config)
    cohorts = [CohortSpec(sig, tuple(cs)) for sig, cs in groups.items()]
    names = [c.name for c in cohorts]
    if len(set(names)) != len(names):  # a hash collision: never let two cohorts share their state
        raise RuntimeError(f"cohort names collide: {sorted(n for n in names if names.count(n) > 1)}")
    return cohorts


def hyperparameter_arrays(configs: Sequence[Config], schedule_steps: int) -> dict[str, np.ndarray]:
    """The traced optimizer hyperparameters as ``float32[K]`` arrays (trial axis first)."""
    rows = {name: [] for name in OPTIMIZER_HYPERPARAMETERS}
    for c in configs:
        for name in OPTIMIZER_HYPERPARAMETERS:
            if name == "schedule_id":
                value = SCHEDULES.index(c["schedule"])
            elif name == "schedule_steps":
                value = schedule_steps
            else:
                value = c[name]
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


def optimizer_factory(family: str):
    """Returns ``f(**hyperparameters) -> GradientTransformation`` for ``optax.inject_hyperparams``.

    The chain is: clip by global norm (per trial, because it runs inside the vmapped update) ->
    the family's update at the peak learning rate -> the unit-peak schedule.
    ``sgd`` uses coupled L2 weight decay and heavy-ball momentum (0 gives plain SGD); ``adam``
    ignores ``weight_decay``; ``adamw`` uses decoupled weight decay (Loshchilov & Hutter 2019).
    """
    if family not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer family {family!r}")

    def make(
        learning_rate, weight_decay, momentum, b1, b2, warmup_fraction, schedule_id, max_grad_norm, schedule_steps
    ):
        if family == "sgd":
            core = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum))
        elif family == "adam":
            core = optax.adam(learning_rate, b1=b1, b2=b2)
        else:
            core = optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)
        return optax.chain(
            clip_by_global_norm(max_grad_norm),
            core,
            _scale_by_unit_schedule(warmup_fraction, schedule_id, schedule_steps),
        )

    return make


def make_optimizer(family: str, hyperparameters: dict[str, Any]) -> optax.GradientTransformation:
    """The injected optimizer for one trial; its hyperparameters live in its state."""
    return optax.inject_hyperparams(optimizer_factory(family))(**hyperparameters)
