"""Activation checkpointing: keep each block's input, recompute the rest in backward.

Why: under LAM the cascaded aux nets of the early modules are copies of later blocks (plus an EMA twin) that run
at the early modules' full resolution, and the activations they save for backward are the largest share of
MLAAN's peak memory; next come the graphs of the backbone modules a cascade window (MLM) keeps alive.
Recomputing them during the backward costs more forward compute and frees all but one block's activations at
a time (``LocalOptions.grad_checkpointing``, ``--grad-checkpointing``).

The recompute runs a BatchNorm in training mode a second time, which would move its running statistics twice;
they are put back afterwards, so a checkpointed step leaves exactly the state of an ordinary one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .split import mutates_input


class _RunningStatsKept:
    """Restores every BatchNorm running statistic of ``module`` on exit (a recompute must not count twice).

    A class, not a generator: checkpoint enters the same recompute context once per backward that reaches the
    block, and a module graph kept for the cascade window is backwarded twice (its input gradient, then its
    weight gradients)."""

    def __init__(self, module: nn.Module) -> None:
        self.norms = [
            m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
        ]
        self.saved: list[list[torch.Tensor]] = []

    @staticmethod
    def _buffers(norm: nn.modules.batchnorm._BatchNorm) -> list[torch.Tensor]:
        return [b for b in (norm.running_mean, norm.running_var, norm.num_batches_tracked) if b is not None]

    def __enter__(self) -> None:
        self.saved = [[b.clone() for b in self._buffers(m)] for m in self.norms]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for m, values in zip(self.norms, self.saved):
                for target, value in zip(self._buffers(m), values):
                    target.copy_(value)
        self.saved = []


def checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` that saves only ``x`` for backward and recomputes the block's activations there.

    Falls back to a plain call when no gradient is being recorded (evaluation, ``torch.no_grad``)."""
    if not torch.is_grad_enabled():
        return block(x)
    run = block
    if mutates_input(block):  # the checkpoint keeps x for the recompute: the block must write into a copy
        def run(t: torch.Tensor) -> torch.Tensor:
            return block(t.clone())
    return checkpoint(
        run, x, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _RunningStatsKept(block)),
    )


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """Blocks in sequence, each one checkpointed on its own when ``grad_checkpointing``."""
    for block in blocks:
        x = checkpointed(block, x) if grad_checkpointing else block(x)
    return x
