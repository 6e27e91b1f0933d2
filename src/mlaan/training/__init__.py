"""Training on real data sets: configuration, the loop, checkpoints (what ``mlaan train`` runs)."""

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
