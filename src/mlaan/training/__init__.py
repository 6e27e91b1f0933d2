"""Training on real data sets: configuration, the loop, checkpoints (what ``mlaan train`` runs)."""

from .config import TrainConfig, load_yaml, merge
from .loop import evaluate_backbone, evaluate_modules, make_optimizer, make_scheduler, optimizer_step
from .trainer import Trainer, make_trainer

__all__ = [
    "TrainConfig",
    "Trainer",
    "evaluate_backbone",
    "evaluate_modules",
    "load_yaml",
    "make_optimizer",
    "make_scheduler",
    "make_trainer",
    "merge",
    "optimizer_step",
]
