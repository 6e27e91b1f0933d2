"""The training loop's pieces, in view (torchvision's ``train_one_epoch``/``evaluate`` style): the optimizer
recipe and its schedule, the one optimizer step every trainer and benchmark runs, and evaluation.

Recipe (docs/METHOD.md#training-recipe): SGD with Nesterov momentum 0.9 and weight decay 1e-4, a linear warm-up
then a cosine decay to 0, both per optimizer step.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..engine.local_model import MODULE_PATHS


# ---------------------------------------------------------------------------------------------- recipe
def make_optimizer(
    model: torch.nn.Module, lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 1e-4
) -> torch.optim.SGD:
    """SGD over ``model``'s trainable parameters (backbone and aux nets; EMA twins are buffers-only copies and
    have none), Nesterov only where there is momentum (PyTorch refuses it without). Defaults: the paper's."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                           weight_decay=weight_decay)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor for optimizer step ``s``: linear warm-up over ``warmup_steps``, then cosine to 0."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warmup_steps) / span)))

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule of the recipe: :func:`warmup_cosine` as a ``LambdaLR`` (step it after each optimizer
    step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))


# -------------------------------------------------------------------------------------------------- step
def optimizer_step(
    model: Any,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    wait_for_gradients: Callable[[], None] | None = None,
    after_train_step: Callable[[], None] | None = None,
) -> dict:
    """One training step of a :class:`~mlaan.LocalModel`, in the one order every caller needs:
    ``optimizer.zero_grad`` → ``model.train_step`` (forward, every local backward) → ``wait_for_gradients()``
    (a distributed run's all-reduce, ``GradientAverager.wait``) → ``optimizer.step`` →
    ``model.after_optimizer_step`` (the EMA twins follow their blocks; forgetting it freezes every twin).

    ``images`` (B, C, H, W) and ``targets`` (B,) on the model's device. ``after_train_step()`` is called right
    after ``train_step`` (a benchmark's timer). Returns ``train_step``'s statistics; a FloatingPointError from
    ``train_step`` (non-finite loss) propagates before any parameter has changed.
    """
    optimizer.zero_grad(set_to_none=True)
    stats = model.train_step(images, targets)
    if after_train_step is not None:
        after_train_step()
    if wait_for_gradients is not None:
        wait_for_gradients()
    optimizer.step()
    model.after_optimizer_step()
    return stats


# ---------------------------------------------------------------------------------------------- evaluate
def evaluate_backbone(
    backbone: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    reduce: Callable[[dict[str, float]], dict[str, float]] | None = None,
    channels_last: bool = False,
    progress: str | None = None,
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``backbone`` over ``loader`` (eval mode, no grad); batches are
    made channels-last when ``channels_last`` (the backbone's parameters are expected to be so already);
    ``progress``: the label of a progress bar on stderr (none when None)."""
    was_training = backbone.training
    backbone.eval()
    loss_sum = correct = count = 0.0
    batches = loader if progress is None else tqdm(loader, desc=progress, unit="batch", leave=False,
                                                   dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    with torch.no_grad():
        for images, targets in batches:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            if autocast_dtype is not None:
                with torch.autocast(device.type, dtype=autocast_dtype):
                    logits = backbone(images)
            else:
                logits = backbone(images)
            loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").item()
            correct += (logits.argmax(1) == targets).sum().item()
            count += len(targets)
    backbone.train(was_training)
    totals = {"loss_sum": loss_sum, "correct": correct, "count": count}
    if reduce is not None:
        totals = reduce(totals)
    n = max(totals["count"], 1)
    return {"loss": totals["loss_sum"] / n, "accuracy": totals["correct"] / n, "count": int(count)}


def evaluate_modules(model, loader: DataLoader, device: torch.device) -> dict[str, list[float | None]]:
    """Test top-1 accuracy of each local module's aux nets, ``{"independent": [...], "cascaded": [...]}`` (see
    ``LocalModel.module_logits``; the last entry of each: the backbone itself), None where a module has no such
    aux net or it does not classify; eval mode, no grad. Shows which modules' features lag."""
    was_training = model.training
    model.eval()
    correct: dict[str, list[float]] = {}
    classifies: dict[str, list[bool]] = {}
    count = 0
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        for path in MODULE_PATHS:
            predictions = model.module_logits(images, path)
            if path not in correct:
                correct[path], classifies[path] = [0.0] * len(predictions), [p is not None for p in predictions]
            for j, logits in enumerate(predictions):
                if logits is not None:
                    correct[path][j] += (logits.argmax(1) == targets).sum().item()
        count += len(targets)
    model.train(was_training)
    return {path: [c / max(count, 1) if ok else None for c, ok in zip(correct[path], classifies[path])]
            for path in correct}
