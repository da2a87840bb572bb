"""One kind of registry for everything a study names by a string: models, tasks, data sets,
optimizers and hyperparameters (the vocabulary), searchers (``sampler``) and schedulers (``mode``).

Each kind is one :class:`Registry` in the module that owns the kind (``sm2jax.models.MODELS``,
``sm2jax.tasks.TASKS``, ``sm2jax.data.DATASETS``, ``sm2jax.vocabulary.OPTIMIZERS`` and
``HYPERPARAMETERS``, ``sm2jax.search``'s and ``sm2jax.schedule``'s), filled by that module's
``register_*`` function (which checks what the kind needs), with one behaviour for all of them
(big_vision's ``Registry`` in spirit):

* a name registered again replaces the earlier entry (a re-run notebook cell), except the
  built-in ones (:meth:`Registry.seal`), which are refused in one line;
* an unknown name is one line naming the known ones and how to register yours;
* it reads as a mapping (``name in r``, ``r[name]``, ``r.items()``, ``r.get(name, default)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_MISSING: Any = object()


class Registry(Generic[T]):
    """Entries of one kind by name (see the module docstring).

    Args:
      kind: what it holds, as errors say it (``model``, ``data set``, ``sampler``).
      how: the function that registers one (``sm2jax.register_model``), said in the errors.
      hint: more to say after an unknown name (how else to get one), or ``""``.
    """

    def __init__(self, kind: str, how: str, hint: str = ""):
        self.kind, self.how, self.hint = kind, how, hint
        self._items: dict[str, T] = {}
        self._builtin: frozenset[str] = frozenset()

    def register(self, item: T, name: str | None = None) -> T:
        """Adds ``item`` as ``name`` (default: its ``name`` attribute), replacing one registered
        before under that name, but never a built-in one; returns it."""
        name = getattr(item, "name", None) if name is None else name
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} needs a name (got {name!r})")
        self.refuse_builtin(name)
        self._items[name] = item
        return item

    def refuse_builtin(self, name: str) -> None:
        """One line when ``name`` is a built-in entry (a ``register_*`` calls it before its checks)."""
        if name in self._builtin:
            raise ValueError(
                f"{self.kind} {name!r} is built in and cannot be replaced: register yours under another name"
            )

    def seal(self) -> None:
        """Makes every entry registered so far built in: never replaced or removed."""
        self._builtin = frozenset(self._items)

    def builtin(self) -> frozenset[str]:
        return self._builtin

    def get(self, name: Any, default: Any = _MISSING) -> T:
        """The entry ``name``; without ``default``, an unknown name is one line naming the known
        ones and how to register yours."""
        if isinstance(name, str) and name in self._items:
            return self._items[name]
        if default is not _MISSING:
            return default
        hint = f"; {self.hint}" if self.hint else ""
        raise ValueError(
            f"unknown {self.kind} {name!r}; known: {', '.join(self.names())} (register yours with {self.how}{hint})"
        )

    __getitem__ = get

    def pop(self, name: str) -> T:
        """Removes a registered entry (a test's clean-up); built-in ones are refused."""
        self.refuse_builtin(name)
        return self._items.pop(name)

    def names(self) -> list[str]:
        """The known names: the built-in ones in their order, then yours sorted."""
        return [n for n in self._items if n in self._builtin] + sorted(n for n in self._items if n not in self._builtin)

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._items[n]) for n in self.names()]

    def __contains__(self, name: Any) -> bool:
        return isinstance(name, str) and name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
