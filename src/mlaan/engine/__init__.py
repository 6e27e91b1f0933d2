"""The engine: splitting, auxiliary heads, methods, MLAAN's MLM and LAM, and the local training step.

The option declarations and the method registry are importable without torch (``mlaan --help`` is built from
them); :class:`LocalModel` and :func:`create_local_model` import it on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .methods import available_methods, parse_method
from .options import LocalOptions, make_options, option_fields

if TYPE_CHECKING:
    from .local_model import LocalModel, create_local_model

__all__ = ["LocalModel", "LocalOptions", "available_methods", "create_local_model", "make_options", "option_fields",
           "parse_method"]


def __getattr__(name: str) -> Any:
    """``LocalModel`` and ``create_local_model``, imported (with torch) when first asked for."""
    if name in ("LocalModel", "create_local_model"):
        from . import local_model

        return getattr(local_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
