"""Search spaces: typed domains, grid and seeded random sampling, validated configurations.

A :class:`SearchSpace` maps hyperparameter names to domains. Every configuration it produces is
*complete* (unspecified hyperparameters take the defaults in :data:`DEFAULTS`) and carries a stable
integer ``trial_id`` (its index in the generated sequence, deterministic for a given space and seed)
and a content ``key`` (a short hash of its values) so that results can be matched across runs.

Hyperparameters split into two kinds (see :mod:`sm2jax.cohort`):

* **static** ones change array shapes or the program (``model``, ``batch_size``, ``optimizer``,
  ``dropout``, ``dtype``); configurations that differ in them cannot share one ``vmap``;
* **traced** ones are numbers that live in the optimizer state with a leading trial axis
  (``learning_rate``, ``weight_decay``, ``momentum``, ``b1``, ``b2``, ``warmup_fraction``,
  ``schedule``, ``max_grad_norm``, ``seed``); changing them never recompiles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sm2jax.vocabulary import HYPERPARAMETERS, OPTIMIZERS, SCHEDULES, optimizer_defaults

DTYPES = ("float32", "bfloat16")
AUGMENTATIONS = ("none", "crop_flip")

_SETTINGS = {  # the settings; a traced number's default is the vocabulary's (HYPERPARAMETERS)
    "model": {"name": "mlp", "hidden": [64]},
    "batch_size": 32,
    "optimizer": "adam",
    "dtype": "float32",
    "augment": "none",
    "schedule": "constant",
    "seed": 0,
}
DEFAULTS: dict[str, Any] = {
    name: _SETTINGS[name] if name in _SETTINGS else HYPERPARAMETERS[name].default
    for name in (
        *("model", "batch_size", "optimizer", "dropout", "dtype", "augment", "learning_rate", "weight_decay"),
        *("momentum", "b1", "b2", "warmup_fraction", "schedule", "max_grad_norm", "seed"),
    )
}


def _check_value(name: str, value: Any) -> None:
    """Raises ``ValueError`` naming ``name`` if ``value`` is not admissible for it."""

    def fail(why: str) -> None:
        raise ValueError(f"hyperparameter {name!r}: {why} (got {value!r})")

    if name not in DEFAULTS and name not in HYPERPARAMETERS:
        fail(
            f"unknown hyperparameter; known: {sorted({*DEFAULTS, *HYPERPARAMETERS})} (declare yours with sm2jax.register_hyperparameter, or register an optimizer that takes it)"
        )
    if name == "model":
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, Mapping) or not isinstance(value.get("name"), str):
            fail("must be a model name or a mapping with a 'name' entry")
        from sm2jax.models import MODELS  # local: models import jax, keep space light

        if value["name"] not in MODELS:
            fail(
                f"unknown model; known: {MODELS.names()} (register yours with sm2jax.register_model; resuming, name the module that registers it: --import MODULE)"
            )
    elif name == "optimizer":
        if value not in OPTIMIZERS:
            fail(f"unknown optimizer; known: {OPTIMIZERS.names()} (register yours with sm2jax.register_optimizer)")
    elif name == "schedule":
        if value not in SCHEDULES:
            fail(f"unknown schedule; known: {list(SCHEDULES)}")
    elif name == "dtype":
        if value not in DTYPES:
            fail(f"unknown dtype; known: {list(DTYPES)}")
    elif name == "augment":
        if value not in AUGMENTATIONS:
            fail(f"unknown augmentation; known: {list(AUGMENTATIONS)}")
    elif name in ("batch_size", "seed"):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            fail("must be an integer")
        if name == "batch_size" and value < 1:
            fail("must be >= 1")
        if name == "seed" and not 0 <= value < 2**31:
            fail("must be in [0, 2**31)")
    else:
        problem = HYPERPARAMETERS[name].problem(value)
        if problem:
            fail(problem)


def canonical_model(value: Any) -> dict[str, Any]:
    """Returns the model spec as a plain dict with a ``name`` entry (a bare string is a name)."""
    if isinstance(value, str):
        return {"name": value}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(value).items()}


# --------------------------------------------------------------------------------------- domains


@dataclasses.dataclass(frozen=True)
class Fixed:
    """A single value."""

    value: Any

    def grid(self) -> list[Any]:
        return [self.value]

    def size(self) -> int:
        return 1

    def value_at(self, u: float) -> Any:
        return self.value

    def sample(self, rng: np.random.Generator) -> Any:
        return self.value

    def check(self, name: str) -> None:
        _check_value(name, self.value)


@dataclasses.dataclass(frozen=True)
class Categorical:
    """One of a finite list of choices."""

    choices: tuple[Any, ...]

    def __init__(self, choices: Sequence[Any]):
        object.__setattr__(self, "choices", tuple(choices))

    def grid(self) -> list[Any]:
        return list(self.choices)

    def size(self) -> int:
        return len(self.choices)

    def value_at(self, u: float) -> Any:
        return self.choices[int(u * len(self.choices))]

    def sample(self, rng: np.random.Generator) -> Any:
        """A uniform choice: :meth:`value_at` of a uniform ``u`` in distribution, drawn as an exact
        integer index (numpy's bounded integers: the draws random studies always made)."""
        return self.choices[int(rng.integers(len(self.choices)))]

    def check(self, name: str) -> None:
        if not self.choices:
            raise ValueError(f"hyperparameter {name!r}: empty categorical domain")
        for choice in self.choices:
            _check_value(name, choice)


@dataclasses.dataclass(frozen=True)
class Uniform:
    """A float drawn uniformly from ``[low, high]``; the grid has ``num`` evenly spaced points."""

    low: float
    high: float
    num: int = 3

    def grid(self) -> list[float]:
        return [float(v) for v in np.linspace(self.low, self.high, self.num)]

    def size(self) -> int:
        """Points in :meth:`grid`, without making it."""
        return self.num

    def value_at(self, u: float) -> float:
        return float(self.low + u * (self.high - self.low))

    def sample(self, rng: np.random.Generator) -> float:
        return self.value_at(rng.random())  # (bit for bit numpy's uniform(low, high): one double)

    def check(self, name: str) -> None:
        if not self.low <= self.high:
            raise ValueError(f"hyperparameter {name!r}: lower bound {self.low} > upper bound {self.high}")
        if self.num < 1:
            raise ValueError(f"hyperparameter {name!r}: grid needs num >= 1 (got {self.num})")
        _check_value(name, self.low)
        _check_value(name, self.high)


@dataclasses.dataclass(frozen=True)
class LogUniform(Uniform):
    """A positive float whose logarithm is uniform on ``[log low, log high]``."""

    def grid(self) -> list[float]:
        return [float(v) for v in np.geomspace(self.low, self.high, self.num)]

    def value_at(self, u: float) -> float:
        return float(np.exp(np.log(self.low) + u * (np.log(self.high) - np.log(self.low))))

    def check(self, name: str) -> None:
        if not self.low > 0:
            raise ValueError(f"hyperparameter {name!r}: log domain needs a positive lower bound (got {self.low})")
        super().check(name)


@dataclasses.dataclass(frozen=True)
class IntUniform:
    """An integer in ``[low, high]`` (inclusive), optionally log-spaced; the grid holds every value
    (or ``num`` spaced values when ``num`` is given)."""

    low: int
    high: int
    log: bool = False
    num: int | None = None

    def grid(self) -> list[int]:
        if self.num is None:
            return list(range(self.low, self.high + 1))
        space = np.geomspace if self.log else np.linspace
        return sorted({round(v) for v in space(self.low, self.high, self.num)})

    def size(self) -> int:
        """Values in :meth:`grid`, without making a large one (spaced values that round alike count
        once: exact up to 100,000 points, an upper bound above)."""
        span = self.high - self.low + 1
        if self.num is None:
            return span
        return len(self.grid()) if self.num <= 100_000 else min(self.num, span)

    def value_at(self, u: float) -> int:
        """Linear: each integer with probability ``1 / (high - low + 1)``. Log-scaled: a log-uniform
        number on ``[low, high + 1)`` rounded down, so integer ``k`` has probability
        ``log((k + 1) / k) / log((high + 1) / low)`` and both ends their full share."""
        if self.log:
            lo, hi = np.log(self.low), np.log(self.high + 1)
            return min(int(np.exp(lo + u * (hi - lo))), self.high)
        return int(self.low + int(u * (self.high - self.low + 1)))

    def sample(self, rng: np.random.Generator, *, rounded: bool = False) -> int:
        """:meth:`value_at` of a uniform draw (an exact integer index where linear: the draws random
        studies always made). ``rounded``: a log-scaled draw as studies from before their proposals
        were kept made it, ``round(exp(U(log low, log high)))`` (ends at half their share), to take
        such a study's first round back as it was drawn."""
        if self.log and rounded:
            return round(np.exp(rng.uniform(np.log(self.low), np.log(self.high))))
        if self.log:
            return self.value_at(rng.random())
        return int(rng.integers(self.low, self.high + 1))

    def check(self, name: str) -> None:
        if not self.low <= self.high:
            raise ValueError(f"hyperparameter {name!r}: lower bound {self.low} > upper bound {self.high}")
        if self.log and self.low < 1:
            raise ValueError(f"hyperparameter {name!r}: log domain needs low >= 1 (got {self.low})")
        _check_value(name, self.low)
        _check_value(name, self.high)


Domain = Fixed | Categorical | Uniform | LogUniform | IntUniform


# ------------------------------------------------------------------------------- configurations


@dataclasses.dataclass(frozen=True)
class Config:
    """One complete configuration.

    Attributes:
      trial_id: stable integer id (index in the generated sequence); seeds per-trial PRNG keys.
      values: every hyperparameter in :data:`DEFAULTS`, filled with defaults where unspecified.
    """

    trial_id: int
    values: Mapping[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    @property
    def key(self) -> str:
        """A short content hash: the same values give the same key in any run."""
        blob = json.dumps(self.values, sort_keys=True, default=str).encode()
        return hashlib.sha1(blob).hexdigest()[:10]

    def to_json(self) -> dict[str, Any]:
        values = dict(self.values)
        if math.isinf(values["max_grad_norm"]):
            values["max_grad_norm"] = "inf"
        return {"trial_id": self.trial_id, "values": values}

    @classmethod
    def from_json(cls, blob: Mapping[str, Any]) -> Config:
        values = dict(blob["values"])
        values["max_grad_norm"] = float(values["max_grad_norm"])
        return cls(int(blob["trial_id"]), values)

    def describe(self, names: Sequence[str] | None = None) -> str:
        names = names or [n for n in DEFAULTS if n != "model"]
        parts = []
        for n in names:
            v = self.values[n]
            parts.append(f"{n}={v:.3g}" if isinstance(v, float) else f"{n}={v}")
        return " ".join(parts)


def make_config(trial_id: int, **values: Any) -> Config:
    """Builds one validated, complete configuration (defaults fill the rest)."""
    for name, value in values.items():
        _check_value(name, value)
    full = dict(DEFAULTS)
    full.update(optimizer_defaults(values.get("optimizer", DEFAULTS["optimizer"])))
    full.update(values)
    full["model"] = canonical_model(full["model"])
    for name in full:
        if name in HYPERPARAMETERS:
            full[name] = float(full[name])
    full["batch_size"] = int(full["batch_size"])
    full["seed"] = int(full["seed"])
    return Config(trial_id, full)


class SearchSpace:
    """A mapping from hyperparameter names to domains (plain values mean :class:`Fixed`).

    Example:
      >>> space = SearchSpace({"learning_rate": LogUniform(1e-3, 1e-1, num=3),
      ...                      "batch_size": Categorical([16, 64])})
      >>> len(space.grid())
      6
    """

    def __init__(self, domains: Mapping[str, Any]):
        if not domains:
            raise ValueError("empty search space: give at least one hyperparameter")
        self.domains: dict[str, Domain] = {}
        for name, domain in domains.items():
            if not isinstance(domain, (Fixed, Categorical, Uniform, LogUniform, IntUniform)):
                domain = Fixed(domain)
            domain.check(name)
            self.domains[name] = domain

    def grid(self) -> list[Config]:
        """Every combination of the domains' grids, in a deterministic order."""
        names = list(self.domains)
        product = itertools.product(*(self.domains[n].grid() for n in names))
        return [make_config(i, **dict(zip(names, combo))) for i, combo in enumerate(product)]

    def grid_size(self) -> int:
        """How many configurations :meth:`grid` makes, computed without making them."""
        return math.prod(d.size() for d in self.domains.values())

    @staticmethod
    def grid_size_of(blob: Mapping[str, Any]) -> int | None:
        """:meth:`grid_size` of a :meth:`to_json` mapping without validating its values (a model
        registered by a module not imported yet is fine here); ``None`` where it is not of that form
        (:meth:`from_json` says why, later)."""
        kinds = {k.__name__: k for k in (Fixed, Categorical, Uniform, LogUniform, IntUniform)}
        try:
            domains = [kinds[d["type"]](**{k: v for k, v in d.items() if k != "type"}) for d in blob.values()]
            return math.prod(d.size() for d in domains)
        except (AttributeError, KeyError, TypeError, ValueError):
            return None

    def sample(self, num: int, seed: int = 0, *, rounded_log_ints: bool = False) -> list[Config]:
        """``num`` configurations drawn independently with ``numpy`` seeded by ``seed``: each value
        its domain's :meth:`value_at` of a uniform draw (``rounded_log_ints``: see
        :meth:`IntUniform.sample`)."""
        if num < 1:
            raise ValueError(f"sample needs num >= 1 (got {num})")
        rng = np.random.default_rng(seed)
        draw = lambda d: (
            d.sample(rng, rounded=True) if rounded_log_ints and isinstance(d, IntUniform) else d.sample(rng)
        )
        return [make_config(i, **{n: draw(d) for n, d in self.domains.items()}) for i in range(num)]

    def rounded_log_ints(self) -> bool:
        """Whether a log-scaled integer is searched (whose random draws changed: :meth:`IntUniform.sample`)."""
        return any(isinstance(d, IntUniform) and d.log for d in self.domains.values())

    def to_json(self) -> dict[str, Any]:
        blob = {n: {"type": type(d).__name__, **dataclasses.asdict(d)} for n, d in self.domains.items()}
        return json.loads(json.dumps(blob))  # tuples become lists: equal to what spec.json reads back

    @classmethod
    def from_json(cls, blob: Mapping[str, Any]) -> SearchSpace:
        kinds = {k.__name__: k for k in (Fixed, Categorical, Uniform, LogUniform, IntUniform)}
        domains = {}
        if not isinstance(blob, Mapping):
            raise ValueError(
                f'space must map hyperparameter names to domains, as SearchSpace({{...}}).to_json() writes (got {blob!r}), e.g. {{"learning_rate": {{"type": "Fixed", "value": 0.01}}}}'
            )
        for name, spec in blob.items():
            if not isinstance(spec, Mapping) or spec.get("type") not in kinds:
                raise ValueError(
                    f'space: {name!r} must be a domain with a type of {", ".join(kinds)} (got {spec!r}), e.g. {{"type": "Fixed", "value": {json.dumps(spec) if not isinstance(spec, Mapping) else 0.01}}}'
                )
            spec = dict(spec)
            kind = spec.pop("type")
            try:
                domains[name] = kinds[kind](**spec)
            except TypeError as err:
                raise ValueError(f"space: {name!r}: {kind} {err}") from None
        return cls(domains)
