"""One registry for what users pick by name (objectives' weight schemes, rewards, tasks).

A name is either a registered key or a dotted import path ``package.module.attr`` (or
``package.module:attr``), so users can plug in their own function without registering it.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object map that refuses duplicate names.

    >>> r = Registry("color")
    >>> @r.register("red")
    ... def red(): return "#f00"
    >>> r.resolve("red")()
    '#f00'
    >>> r.resolve("os.path.join") is __import__("os").path.join
    True
    >>> r.resolve("blue")
    Traceback (most recent call last):
    ...
    KeyError: "unknown color 'blue'; valid choices: red, or a dotted import path like 'my_pkg.module.function'"
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding ``obj`` under ``name``; a second ``name`` raises ``ValueError``."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def resolve(self, name: str) -> T:
        """Return the object registered as ``name``, or import it when ``name`` is a dotted path."""
        if name in self._items:
            return self._items[name]
        if "." in name or ":" in name:
            module_name, _, attr = name.replace(":", ".").rpartition(".")
            try:
                return getattr(_import_here_too(module_name), attr)
            except (ImportError, AttributeError) as err:
                raise KeyError(f"cannot import {self.kind} {name!r}: {err} (the working directory is searched too)"
                               ) from err
        raise KeyError(
            f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}, "
            "or a dotted import path like 'my_pkg.module.function'"
        )


def _import_here_too(module_name: str):
    """Import ``module_name``; if its top-level package is not found, look in the working directory too,
    as ``python -m`` would (the ``gvpo`` command's own folder is on ``sys.path``, the user's is not)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        cwd = os.getcwd()
        if err.name != module_name.split(".")[0] or cwd in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(module_name)
