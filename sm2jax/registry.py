"""One kind of registry for what a study names by a string: searchers (``sampler``) and schedulers
(``mode``) so far; models, tasks, data sets and optimizers have registries of their own still."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects by their ``name`` attribute, each registered once more to replace it.

    Args:
      field: the spec field that names them (``sampler``), for one-line errors.
      how: how to add one (``register_searcher(...)``), said in the error.
      extra: further known names that live elsewhere (said in the error, not registered here).
    """

    def __init__(self, field: str, how: str, extra: tuple[str, ...] = ()):
        self.field, self.how, self.extra = field, how, extra
        self._items: dict[str, T] = {}

    def register(self, item: T) -> T:
        name = getattr(item, "name", None)
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.field} needs a name (got {name!r})")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        if name not in self._items:
            known = ", ".join([*self._items, *self.extra])
            raise ValueError(f"{self.field}: unknown {name!r}; known: {known} (or {self.how} yours)")
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: Any) -> bool:
        return name in self._items
