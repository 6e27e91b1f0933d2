"""The training set's order: a permutation fixed by ``(seed, epoch)`` (:class:`EpochSampler`), so that a resumed run
reads the same images in the same order as an uninterrupted one, and any sampler without its first indices
(:class:`SkipFirst`: resuming in the middle of an epoch)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """A permutation of ``range(n)`` fixed by ``(seed, epoch)``, so a resumed run sees the same order; with
    ``skip`` the first indices are left out (resuming in the middle of an epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        yield from torch.randperm(self.n, generator=g).tolist()

    def __len__(self) -> int:
        return self.n


class SkipFirst(Sampler[int]):
    """Any sampler without its first ``skip`` indices."""

    def __init__(self, base: Sampler, skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator[int]:
        for i, index in enumerate(self.base):
            if i >= self.skip:
                yield index

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)
