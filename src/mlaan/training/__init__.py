"""Training on real data sets: configuration, the loop, checkpoints (what ``mlaan train`` runs).

The names below are imported on first use: ``mlaan.training.config`` (which ``mlaan --help`` reads) does not
pull in the loop, the trainer or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .config import TrainConfig, load_yaml, merge
    from .export import load_local_model
    from .loop import (
        EpochMeter,
        evaluate,
        evaluate_backbone,
        evaluate_modules,
        has_batchnorm,
        make_optimizer,
        make_scheduler,
        optimizer_step,
        precise_batchnorm,
        train_one_epoch,
    )
    from .resume import resolve_run
    from .trainer import Trainer, make_trainer

_WHERE = {
    "TrainConfig": "config",
    "load_yaml": "config",
    "merge": "config",
    "load_local_model": "export",
    "EpochMeter": "loop",
    "evaluate": "loop",
    "train_one_epoch": "loop",
    "evaluate_backbone": "loop",
    "evaluate_modules": "loop",
    "has_batchnorm": "loop",
    "precise_batchnorm": "loop",
    "make_optimizer": "loop",
    "make_scheduler": "loop",
    "optimizer_step": "loop",
    "Trainer": "trainer",
    "make_trainer": "trainer",
    "resolve_run": "resume",
}

__all__ = [
    "EpochMeter",
    "TrainConfig",
    "Trainer",
    "evaluate",
    "evaluate_backbone",
    "evaluate_modules",
    "has_batchnorm",
    "load_local_model",
    "load_yaml",
    "make_optimizer",
    "make_scheduler",
    "make_trainer",
    "merge",
    "optimizer_step",
    "precise_batchnorm",
    "resolve_run",
    "train_one_epoch",
]


__getattr__ = lazy_exports(__name__, _WHERE)
