"""Local-learning methods. Importing a method's module registers it; adding one touches one file here."""

from . import auglocal, bp, dgl, infopro  # noqa: F401  (registration side effect)
from .base import AuxContext, LocalMethod, LocalOptions
from .registry import SUFFIXES, MethodSpec, available_methods, parse_method, register

__all__ = [
    "SUFFIXES",
    "AuxContext",
    "LocalMethod",
    "LocalOptions",
    "MethodSpec",
    "available_methods",
    "parse_method",
    "register",
]
