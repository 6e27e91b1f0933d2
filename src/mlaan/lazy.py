"""Lazy package exports (PEP 562): a package lists which submodule defines each public name, and the name is
imported only when first asked for. Torch-free, so that ``mlaan --help`` can read the declarations of packages
whose other modules need torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package``: ``name`` in ``where`` is imported from the submodule
    ``package.<where[name]>`` on first use; any other name raises AttributeError, as a module does."""

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(f".{where[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
