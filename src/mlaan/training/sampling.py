"""A run's data, batch by batch: the training set's order, a permutation fixed by ``(seed, epoch)``
(:class:`EpochSampler`), so that a resumed run reads the same images in the same order as an uninterrupted one;
any sampler without its first indices (:class:`SkipFirst`: resuming in the middle of an epoch); and the run's
training and test loaders (:class:`RunLoaders`)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import distributed as dist
from ..data.device import DeviceBatches, DeviceImages
from . import safety

if TYPE_CHECKING:
    from ..distributed import DistContext
    from .config import TrainConfig


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A seed of its own for each (run seed, rank, step): distinct ranks never share a random stream."""
    return ((seed * 1_000_003 + step) * 1009 + rank) % 2**63


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global random streams (what crops, flips and model init draw from)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


class RunLoaders:
    """A run's training and test loaders: the training set in :class:`EpochSampler`'s order (or the distributed
    sampler's shard of it), through a DataLoader or, with ``--data-on-device``, batches cut on the device
    (:class:`~mlaan.data.device.DeviceBatches`); their randomness fixed by (seed, epoch, rank), so that building a
    loader draws nothing from the global RNG a checkpoint restores. ``own_random_streams``: each rank augments
    its own shard (data parallelism); ``workers``: DataLoader worker processes; ``replica``: pipeline replicas
    (``--data-parallel``), this rank's replica among them, which reads the shard (and draws the random streams)
    of the data-parallel rank of its index."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, train_set: Dataset, test_set: Dataset, workers: int,
                 own_random_streams: bool, replica: DistContext | None = None) -> None:
        self.cfg, self.ctx, self.device, self.replica = cfg, ctx, ctx.device, replica
        self.train_set, self.test_set, self.workers = train_set, test_set, workers
        self.own_random_streams = own_random_streams
        self._on_device: dict[str, DeviceImages] = {}
        self.sampler = self._train_sampler()

    def _train_sampler(self) -> Sampler:
        if self.replica is not None:  # every stage of a replica reads the replica's shard
            return dist.make_train_sampler(self.train_set, self.replica, self.cfg.seed)
        if self.cfg.module_parallel:  # every rank reads every batch
            return EpochSampler(len(self.train_set), self.cfg.seed)
        sampler = dist.make_train_sampler(self.train_set, self.ctx, self.cfg.seed)  # None in one process
        return sampler if sampler is not None else EpochSampler(len(self.train_set), self.cfg.seed)

    def _stream_seed(self, epoch: int) -> int:
        """The seed of an epoch's loader randomness, fixed by (seed, epoch, rank)."""
        rank = (self.replica or self.ctx).rank if self.own_random_streams else 0
        return (self.cfg.seed * 1000003 + epoch) * 1009 + rank

    def _loader_generator(self, epoch: int) -> torch.Generator:
        """The DataLoader's own generator (worker seeds): building a loader draws nothing from the global RNG,
        which the augmentations use and a checkpoint restores."""
        return torch.Generator().manual_seed(self._stream_seed(epoch))

    def _device_data(self, split: str) -> DeviceImages:
        """``--data-on-device``: the split's images, copied to the device once and kept."""
        if split not in self._on_device:
            self._on_device[split] = DeviceImages(self.train_set if split == "train" else self.test_set, self.device)
        return self._on_device[split]

    def train(self, skip_samples: int, epoch: int = 0) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of training epoch ``epoch`` (from 0), without its first ``skip_samples`` images (resuming
        in its middle)."""
        sampler = SkipFirst(self.sampler, skip_samples) if skip_samples else self.sampler
        # whether the epoch's last, smaller batch is left out is the whole epoch's (not what a resume has left)
        drop_last = len(self.sampler) >= self.cfg.batch_size
        if self.cfg.data_on_device:  # crops and flips by (seed, epoch, rank, batch): no state to checkpoint
            return DeviceBatches(self._device_data("train"), sampler, self.cfg.batch_size,
                                 drop_last=drop_last,
                                 first_batch=skip_samples // self.cfg.batch_size, seed=self._stream_seed(epoch))
        return DataLoader(
            self.train_set,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            generator=self._loader_generator(epoch),
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            drop_last=drop_last,  # no batch of one (BatchNorm) unless all is tiny
            persistent_workers=False,
            worker_init_fn=safety.ignore_stop_signals if self.workers > 0 else None,
        )

    def test(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """The test set's batches: this rank's disjoint shard under torchrun, in order; a module pipeline's
        stages all read their replica's (each runs its own blocks of every batch)."""
        if self.cfg.module_parallel and self.ctx.enabled:
            sampler = dist.make_eval_sampler(self.test_set, self.replica) if self.replica is not None else None
        else:
            sampler = dist.make_eval_sampler(self.test_set, self.ctx)  # a disjoint shard per rank, or None
        batch_size = self.cfg.eval_batch_size or 2 * self.cfg.batch_size
        if self.cfg.data_on_device:
            order = sampler if sampler is not None else range(len(self.test_set))
            return DeviceBatches(self._device_data("test"), order, batch_size)
        return DataLoader(
            self.test_set,
            sampler=sampler,
            generator=self._loader_generator(-1),
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
        )
