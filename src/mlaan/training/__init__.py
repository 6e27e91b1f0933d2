"""Training on real data sets: configuration, the loop, checkpoints (what ``mlaan train`` runs).

The names below are imported on first use: ``mlaan.training.config`` (which ``mlaan --help`` reads) does not
pull in the loop, the trainer or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import TrainConfig, load_yaml, merge
    from .loop import (
        EpochMeter,
        evaluate,
        evaluate_backbone,
        evaluate_modules,
        make_optimizer,
        make_scheduler,
        optimizer_step,
        train_one_epoch,
    )
    from .trainer import Trainer, make_trainer

_WHERE = {
    "TrainConfig": "config",
    "load_yaml": "config",
    "merge": "config",
    "EpochMeter": "loop",
    "evaluate": "loop",
    "train_one_epoch": "loop",
    "evaluate_backbone": "loop",
    "evaluate_modules": "loop",
    "make_optimizer": "loop",
    "make_scheduler": "loop",
    "optimizer_step": "loop",
    "Trainer": "trainer",
    "make_trainer": "trainer",
}

__all__ = [
    "EpochMeter",
    "TrainConfig",
    "Trainer",
    "evaluate",
    "evaluate_backbone",
    "evaluate_modules",
    "load_yaml",
    "make_optimizer",
    "make_scheduler",
    "make_trainer",
    "merge",
    "optimizer_step",
    "train_one_epoch",
]


def __getattr__(name: str) -> Any:
    """The public names, each imported from its module when first asked for."""
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
