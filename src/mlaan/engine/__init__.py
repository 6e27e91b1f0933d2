"""The engine: splitting, auxiliary heads, methods, MLAAN's MLM and LAM, and the local training step.

The option declarations and the method registry are importable without torch (``mlaan --help`` is built from
them); :class:`LocalModel` and :func:`create_local_model` import it on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports
from .methods import available_methods, parse_method
from .options import LocalOptions, make_options, option_fields

if TYPE_CHECKING:
    from .local_model import LocalModel, ModulePlan, create_local_model
    from .phases import STEP_PHASES
    from .step import LocalStep

__all__ = ["STEP_PHASES", "LocalModel", "LocalOptions", "LocalStep", "ModulePlan", "available_methods",
           "create_local_model", "make_options", "option_fields", "parse_method"]
_LAZY = {"LocalModel": "local_model", "LocalStep": "step", "ModulePlan": "local_model",
         "create_local_model": "local_model", "STEP_PHASES": "phases"}


__getattr__ = lazy_exports(__name__, _LAZY)
