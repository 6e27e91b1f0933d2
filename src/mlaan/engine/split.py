"""Cutting a backbone into K contiguous local modules, computed (never tabled).

Units are the stem and the residual blocks (``blocks[:-1]``); the head always rides with the last unit.
K counts the stem's module, so K ranges over 1 … number of units (= residual blocks + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

BALANCE_MODES = ("blocks", "memory")


@dataclass(frozen=True)
class BlockProfile:
    """What one dummy forward tells about each block: its input/output shapes and saved-activation bytes."""

    in_shapes: list[tuple[int, ...]]
    out_shapes: list[tuple[int, ...]]
    saved_bytes: list[int]

    def changes_shape(self, index: int) -> bool:
        return self.in_shapes[index] != self.out_shapes[index]


def profile_blocks(blocks: nn.ModuleList, input_shape: tuple[int, int, int], batch: int = 2) -> BlockProfile:
    """Run a dummy batch through ``blocks`` in eval mode (no BatchNorm statistics change) and record
    shapes (without the batch dimension) and the bytes autograd saves for backward in each block."""
    was_training = [m.training for m in blocks]
    blocks.eval()
    params = next(iter(blocks.parameters()))
    x = torch.zeros(batch, *input_shape, device=params.device, dtype=params.dtype)
    in_shapes, out_shapes, saved = [], [], []
    try:
        for block in blocks:
            storages: dict[int, int] = {}

            def pack(t: torch.Tensor, storages: dict[int, int] = storages) -> torch.Tensor:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            x = x.detach().requires_grad_()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = block(x)
            in_shapes.append(tuple(x.shape[1:]))
            out_shapes.append(tuple(y.shape[1:]))
            saved.append(sum(storages.values()) // batch)
            x = y
    finally:
        for module, mode in zip(blocks, was_training):
            module.train(mode)
    return BlockProfile(in_shapes, out_shapes, saved)


def split_sizes(costs: list[float], num_modules: int) -> list[int]:
    """Partition ``costs`` into ``num_modules`` contiguous non-empty runs minimising the largest run's sum.

    Ties go to the partition found first scanning from the front, so equal costs give
    ``numpy.array_split``-like sizes (earlier modules take the remainder).
    """
    n = len(costs)
    if not 1 <= num_modules <= n:
        raise ValueError(f"num_local_modules must be between 1 and {n}, got {num_modules}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: minimal max-run cost splitting the first i units into k runs; cut[k][i]: start of last run.
    best = [[inf] * (n + 1) for _ in range(num_modules + 1)]
    cut = [[0] * (n + 1) for _ in range(num_modules + 1)]
    best[0][0] = 0.0
    for k in range(1, num_modules + 1):
        for i in range(k, n - (num_modules - k) + 1):
            for s in range(i - 1, k - 2, -1):
                value = max(best[k - 1][s], prefix[i] - prefix[s])
                if value < best[k][i] - 1e-9:
                    best[k][i], cut[k][i] = value, s
    sizes, i = [], n
    for k in range(num_modules, 0, -1):
        s = cut[k][i]
        sizes.append(i - s)
        i = s
    return sizes[::-1]


def compute_split(
    num_units: int, num_modules: int, balance: str = "blocks", profile: BlockProfile | None = None
) -> list[range]:
    """Index ranges (into ``blocks``) of each local module's units; the head is added to the last by the caller."""
    if balance not in BALANCE_MODES:
        raise ValueError(f"unknown balance {balance!r}; allowed: {', '.join(BALANCE_MODES)}")
    if not isinstance(num_modules, int) or not 1 <= num_modules <= num_units:
        raise ValueError(
            f"num_local_modules={num_modules!r} is impossible for this backbone: "
            f"allowed 1 to {num_units} (residual blocks + 1 for the stem)"
        )
    if balance == "blocks":
        base, extra = divmod(num_units, num_modules)
        sizes = [base + (1 if k < extra else 0) for k in range(num_modules)]
    else:
        if profile is None:
            raise ValueError("balance='memory' needs a block profile")
        sizes = split_sizes([float(b) for b in profile.saved_bytes[:num_units]], num_modules)
    ranges, start = [], 0
    for size in sizes:
        ranges.append(range(start, start + size))
        start += size
    return ranges
