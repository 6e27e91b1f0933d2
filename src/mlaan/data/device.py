"""Batches made on the training device (``mlaan train --data-on-device``).

A DataLoader crops, flips and normalises one image at a time in Python on the CPU, then copies each batch to the
device. For small images on a GPU that feeds the model slower than it trains. Here an in-memory data set's uint8
images are copied to the device once (:class:`DeviceImages`; Fashion-MNIST's 60,000 images are 47 MB), and each
batch is indexed and augmented there in a few batched tensor ops (:meth:`ImageTransform.batch`).

Randomness: the order of the images is the sampler's, as for a DataLoader; the crops and flips of batch ``b`` come
from a generator seeded by (``seed``, ``b``) alone, so a run resumed in the middle of an epoch sees the same
batches without any random state in its checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from .tensors import TensorImageDataset
from .transforms import ImageTransform


class DeviceImages:
    """A data set's images (N, C, H, W) uint8 and labels (N,) int64, held on ``device``, and its
    :class:`ImageTransform`.

    ``dataset``: a :class:`TensorImageDataset` whose transform is an :class:`ImageTransform`, or a
    ``torch.utils.data.Subset`` of one (``--train-samples``). ValueError for anything else (data read from files
    one image at a time, e.g. torchvision's CIFAR-10, or a custom transform)."""

    def __init__(self, dataset: object, device: torch.device | str) -> None:
        base, indices = dataset, None
        if isinstance(dataset, torch.utils.data.Subset):
            base, indices = dataset.dataset, torch.as_tensor(list(dataset.indices), dtype=torch.long)
        if not isinstance(base, TensorImageDataset) or not isinstance(base.transform, ImageTransform):
            raise ValueError(f"--data-on-device needs a data set held in memory as image tensors with a batchable "
                             f"transform (fashion-mnist, synthetic); got {type(base).__name__}")
        images, labels = base.images, base.labels
        if indices is not None:
            images, labels = images[indices], labels[indices]
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.transform: ImageTransform = base.transform

    def __len__(self) -> int:
        return len(self.images)


class DeviceBatches:
    """One pass over ``data`` in ``order`` (a sampler, or any iterable of indices), in batches of ``batch_size``:
    yields ``(images (B, C, S, S) float32 normalised, targets (B,) int64)``, both on ``data``'s device.

    ``drop_last`` leaves out a last, smaller batch (as a DataLoader's). ``first_batch``: the index within the epoch
    of the first batch ``order`` yields (a resumed epoch's ``order`` starts after the batches already trained).
    ``seed``: batch ``b``'s crops and flips are drawn from a generator seeded with ``seed * 1_000_003 + b``; None
    for a transform that draws nothing (ValueError if it does)."""

    def __init__(self, data: DeviceImages, order: Iterable[int], batch_size: int, drop_last: bool = False,
                 first_batch: int = 0, seed: int | None = None) -> None:
        if data.transform.random and seed is None:
            raise ValueError("a random transform (crops, flips) needs a seed")
        self.data, self.order, self.batch_size = data, order, batch_size
        self.drop_last, self.first_batch, self.seed = drop_last, first_batch, seed

    def __len__(self) -> int:
        n = len(self.order)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.data.images.device
        order = torch.as_tensor(list(self.order), dtype=torch.long, device=device)
        for b in range(len(self)):
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            generator = None
            if self.seed is not None:
                batch_seed = (self.seed * 1_000_003 + self.first_batch + b) % 2**63
                generator = torch.Generator(device=device).manual_seed(batch_seed)
            yield self.data.transform.batch(self.data.images[index], generator), self.data.labels[index]
