"""Named registries: selection scorers, compression algorithms, evaluation task kinds.

A registry maps a name from the recipe to a callable; lookups of unknown names raise an error
listing what is registered. Registries are filled by decorators in the modules that define the
entries; `Registry.get` imports the package that holds them first, so nothing runs at import time
of this module.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table with a helpful error for unknown names."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind
        self._package = package  # imported lazily so that its modules register themselves
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def _load(self) -> None:
        importlib.import_module(self._package)

    def get(self, name: str) -> T:
        """The entry called `name`; raises KeyError naming the known entries."""
        self._load()
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} '{name}'; known: {sorted(self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: Any) -> bool:
        self._load()
        return name in self._items


SELECTORS: Registry[Callable] = Registry("selection method", "raycompress.selection")
ALGORITHMS: Registry[Callable] = Registry("compression algorithm", "raycompress.engine.solvers")
TASK_KINDS: Registry[Callable] = Registry("evaluation task kind", "raycompress.evaluation")
