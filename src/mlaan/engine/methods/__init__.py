"""Local-learning methods, one module each. Every module of this package is imported (and so registers its
method); methods living outside mlaan register through the ``mlaan.methods`` entry-point group, whose entries
name a module or a :class:`LocalMethod` subclass to load."""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from importlib.metadata import entry_points

from ..options import LocalOptions
from .base import AuxContext, LocalMethod
from .registry import SUFFIXES, MethodSpec, available_methods, parse_method, register, registered_methods

ENTRY_POINT_GROUP = "mlaan.methods"


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
        except Exception as err:  # a broken plug-in must not take mlaan's own methods down with it
            warnings.warn(f"mlaan: method entry point {entry.name!r} ({entry.value}) failed to load: {err}",
                          stacklevel=2)
            continue
        if isinstance(loaded, type) and issubclass(loaded, LocalMethod):
            register(loaded)


_discover()

__all__ = [
    "ENTRY_POINT_GROUP",
    "SUFFIXES",
    "AuxContext",
    "LocalMethod",
    "LocalOptions",
    "MethodSpec",
    "available_methods",
    "parse_method",
    "register",
    "registered_methods",
]
