"""Activation checkpointing for the blocks inside auxiliary nets: keep each block's input, recompute the rest.

Why: under LAM the cascaded aux nets of the early modules are copies of later blocks (plus an EMA twin) that run
at the early modules' full resolution, and the activations they save for backward are the largest share of
MLAAN's peak memory. Recomputing them during the backward costs one more forward of those blocks and frees
all but one block's activations at a time (``LocalOptions.grad_checkpointing``, ``--grad-checkpointing``).

The recompute runs a BatchNorm in training mode a second time, which would move its running statistics twice;
they are put back afterwards, so a checkpointed step leaves exactly the state of an ordinary one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm running statistic of ``module`` on exit (the recompute must not count twice)."""
    norms = [
        m for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
             for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                live = [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
                for target, value in zip(live, buffers):
                    target.copy_(value)


def checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` that saves only ``x`` for backward and recomputes the block's activations there.

    Falls back to a plain call when no gradient is being recorded (evaluation, ``torch.no_grad``)."""
    if not torch.is_grad_enabled():
        return block(x)
    return checkpoint(
        block, x, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _running_stats_kept(block)),
    )


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """Blocks in sequence, each one checkpointed on its own when ``grad_checkpointing``."""
    for block in blocks:
        x = checkpointed(block, x) if grad_checkpointing else block(x)
    return x
