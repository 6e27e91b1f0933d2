"""mlaan: supervised local learning (DGL, InfoPro, AugLocal) with MLAAN's multilaminar leap-augmented
auxiliary networks, on ResNets or your own backbone.

The names below are imported on first use, so that ``import mlaan`` (and ``mlaan --help``) does not import
torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import models
    from .engine import LocalModel, LocalOptions, available_methods, create_local_model
    from .training.export import load_local_model

__all__ = ["LocalModel", "LocalOptions", "available_methods", "create_local_model", "load_local_model", "models"]
__version__ = "0.1.0"

_FROM_ENGINE = ("LocalModel", "LocalOptions", "available_methods", "create_local_model")
_SUBPACKAGES = ("bench", "cli", "data", "distributed", "engine", "models", "runtime", "training")


def __getattr__(name: str) -> Any:
    """The public names and subpackages, imported when first asked for."""
    if name in _FROM_ENGINE:
        return getattr(importlib.import_module(".engine", __name__), name)
    if name == "load_local_model":
        return importlib.import_module(".training.export", __name__).load_local_model
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names, the lazily imported ones included."""
    return sorted({*globals(), *__all__, *_SUBPACKAGES})
