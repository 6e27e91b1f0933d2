"""Activation checkpointing: keep each block's input, recompute the rest in backward.

Why: under LAM the cascaded aux nets of the early modules are copies of later blocks (plus an EMA twin) that run
at the early modules' full resolution, and the activations they save for backward are the largest share of
MLAAN's peak memory; next come the graphs of the backbone modules a cascade window (MLM) keeps alive.
Recomputing them during the backward costs more forward compute and frees all but one block's activations at
a time (``LocalOptions.grad_checkpointing``, ``--grad-checkpointing``).

BP takes the same option (activation checkpointing, the baseline a memory-short user reaches for first): every
backbone block is checkpointed, or segments of ``checkpoint_segment`` consecutive blocks
(``torch.utils.checkpoint.checkpoint_sequential``'s trade-off: fewer saved segment inputs, one segment's
activations alive at a time during the backward; about √n blocks per segment minimises the sum).

The recompute runs a BatchNorm in training mode a second time, which would move its running statistics twice;
they are put back afterwards, so a checkpointed step leaves exactly the state of an ordinary one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .split import mutates_input


class _RunningStatsKept:
    """Restores every BatchNorm running statistic of ``module`` (or of each of a list of modules) on exit (a
    recompute must not count twice).

    A class, not a generator: checkpoint enters the same recompute context once per backward that reaches the
    block, and a module graph kept for the cascade window is backwarded twice (its input gradient, then its
    weight gradients)."""

    def __init__(self, module: nn.Module | Sequence[nn.Module]) -> None:
        modules = [module] if isinstance(module, nn.Module) else list(module)
        self.norms = [
            m for part in modules for m in part.modules()
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
    return checkpointed_segment([block], x)


def checkpointed_segment(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``blocks`` in sequence on ``x``, as one checkpoint: only ``x`` is saved for backward, and the segment's
    activations are recomputed there (BatchNorm running statistics moved once, by the forward). A plain call
    when no gradient is being recorded."""
    blocks = list(blocks)
    if not torch.is_grad_enabled():
        for block in blocks:
            x = block(x)
        return x
    # the checkpoint keeps x for the recompute: a first block that writes into its input must write into a copy
    # (inside the segment every input is a fresh tensor of the recompute's own)
    copy_input = mutates_input(blocks[0])

    def run(t: torch.Tensor) -> torch.Tensor:
        if copy_input:
            t = t.clone()
        for block in blocks:
            t = block(t)
        return t

    return checkpoint(
        run, x, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _RunningStatsKept(blocks)),
    )


def run_trunk(blocks: Iterable[nn.Module], x: torch.Tensor, grad_checkpointing: bool,
              lead_only: bool = False) -> torch.Tensor:
    """An aux net's trunk blocks in sequence; when ``grad_checkpointing``, each is recomputed in backward, or with
    ``lead_only`` the first alone (``checkpoint_trunk="lead"``): it runs at the module's resolution, and on a
    network that downsamples the later blocks of an early module's trunk, past a downsampling, hold half or less."""
    blocks = list(blocks)
    x = run_blocks(blocks[:1], x, grad_checkpointing)
    return run_blocks(blocks[1:], x, grad_checkpointing and not lead_only)


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, grad_checkpointing: bool,
               segment: int = 1) -> torch.Tensor:
    """Blocks in sequence; when ``grad_checkpointing``, each run of ``segment`` consecutive blocks (the last one
    may be shorter) is checkpointed as one (:func:`checkpointed_segment`)."""
    if not grad_checkpointing:
        for block in blocks:
            x = block(x)
        return x
    if segment < 1:
        raise ValueError(f"segment must be at least 1, got {segment}")
    blocks = list(blocks)
    for start in range(0, len(blocks), segment):
        x = checkpointed_segment(blocks[start:start + segment], x)
    return x
