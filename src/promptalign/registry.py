"""Name -> class registries. Methods, regularisers and datasets register themselves with a
decorator in their own file; nothing else keeps a list of them.

A registry imports its packages on first use (as timm imports its models when imported), so
``METHODS.get("coop")`` works without any caller priming it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


def import_package(package: str) -> None:
    """Import ``package`` and every module in it (modules named ``_*`` excepted), so each
    registers; a plain module is just imported."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


class Registry(Generic[T]):
    """A named collection of classes filled by ``@registry.register("name")``.

    Args:
        kind: what is registered (used in error messages).
        packages: packages whose modules register items; imported on the first lookup.
    """

    def __init__(self, kind: str, packages: Sequence[str] = ()):
        self.kind = kind
        self.packages = tuple(packages)
        self._items: dict[str, T] = {}
        self._loaded = not self.packages

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # set first: the imported modules register while we import
            for package in self.packages:
                import_package(package)

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered by {self._items[name]!r}"
                )
            self._items[name] = obj
            obj.registered_name = name
            return obj

        return deco

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; registered: "
                f"{', '.join(sorted(self._items)) or 'none'}"
            ) from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items


METHODS: Registry = Registry("method", ["promptalign.methods"])
REGULARIZERS: Registry = Registry("regularizer", ["promptalign.methods"])
DATASETS: Registry = Registry("dataset", ["promptalign.data.readers"])
