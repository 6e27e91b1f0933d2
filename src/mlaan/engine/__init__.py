"""The engine: splitting, auxiliary heads, methods, MLAAN's MLM and LAM, and the local training step."""

from .local_model import LocalModel, ModulePlan, create_local_model
from .methods import available_methods, parse_method
from .options import LocalOptions, make_options, option_fields
from .phases import STEP_PHASES

__all__ = ["STEP_PHASES", "LocalModel", "LocalOptions", "ModulePlan", "available_methods", "create_local_model",
           "make_options", "option_fields", "parse_method"]
