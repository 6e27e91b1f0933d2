"""The engine: splitting, auxiliary heads, methods, MLAAN's MLM and LAM, and the local training step."""

from .local_model import LocalModel, create_local_model, make_options
from .methods import LocalOptions, available_methods, parse_method

__all__ = ["LocalModel", "LocalOptions", "available_methods", "create_local_model", "make_options", "parse_method"]
