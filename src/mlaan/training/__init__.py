"""Training on real data sets: configuration, the loop, checkpoints (what ``mlaan train`` runs)."""

from .config import TrainConfig, load_yaml, merge
from .trainer import Trainer, evaluate_backbone, evaluate_modules, make_trainer

__all__ = ["TrainConfig", "Trainer", "evaluate_backbone", "evaluate_modules", "load_yaml", "make_trainer", "merge"]
