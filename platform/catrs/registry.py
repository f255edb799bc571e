"""One way to register plug-ins: training methods, architectures and data sets, each where it is defined.

    METHODS = Registry("training method", "trainables")        # in the kind's base module
    METHOD = METHODS.add(Method("gaussian", ...))                # in the plug-in's own module

A registry names the package its plug-ins live in and imports every module of it at the first lookup, so a
new plug-in is one new module (plus its test): nothing else lists it. Items are told apart by `.name`.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, Protocol, TypeVar

from catrs.errors import UserError


class Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    """The plug-ins of one `kind` ("training method", "architecture", "data set"), found in `package`."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind, self.package = kind, package
        self._items: dict[str, T] = {}
        self._discovered = False

    def add(self, item: T) -> T:
        """Registers `item` under its name (at its definition); a second item of that name is a defect."""
        if item.name in self._items and self._items[item.name] is not item:
            raise ValueError(f"two {self.kind}s are named {item.name!r}")
        self._items[item.name] = item
        return item

    def get(self, name: str) -> T:
        """The plug-in `name`; an unknown name is a `UserError` listing the valid ones."""
        items = self._all()
        if name not in items:
            raise UserError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return items[name]

    def names(self) -> list[str]:
        return sorted(self._all())

    def values(self) -> list[T]:
        return [self._all()[name] for name in self.names()]

    def _all(self) -> dict[str, T]:
        if not self._discovered:
            self._discovered = True
            package = importlib.import_module(self.package)
            for module in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.package}.{module.name}")
        return self._items
