"""mlaan: supervised local learning (DGL, InfoPro, AugLocal) with MLAAN's multilaminar leap-augmented
auxiliary networks, on ResNets or your own backbone."""

from . import models
from .engine import LocalModel, LocalOptions, available_methods, create_local_model

__all__ = ["LocalModel", "LocalOptions", "available_methods", "create_local_model", "models"]
__version__ = "0.1.0"
