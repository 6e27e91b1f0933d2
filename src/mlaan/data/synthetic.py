"""Generated data for smoke and memory runs: random images whose class is learnable, no files, no data root."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .registry import DatasetInfo, DatasetOption, DatasetSpec, register
from .transforms import ImageTransform

if TYPE_CHECKING:
    import torch

SYNTHETIC_MEAN, SYNTHETIC_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def make_synthetic(
    size: int, image_size: int = 32, num_classes: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` random 3×S×S uint8 images whose class is learnable: each class has a fixed random coarse
    pattern, each image is that pattern plus per-pixel noise. Deterministic in ``seed``."""
    import torch

    g = torch.Generator().manual_seed(1234)  # the class patterns are the same for every split
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g)
    patterns = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="nearest")
    g.manual_seed(seed)
    labels = torch.randint(0, num_classes, (size,), generator=g)
    noise = torch.rand(size, 3, image_size, image_size, generator=g)
    images = (0.5 * patterns[labels] + 0.5 * noise).mul(255).round().to(torch.uint8)
    return images, labels


def _build(
    spec: DatasetSpec, root: None, download: bool, augment: bool, with_train: bool,
    train_size: int, test_size: int, image_size: int,
) -> tuple[Any, Any, DatasetInfo]:
    from .tensors import TensorImageDataset

    test_tf = ImageTransform(spec.mean, spec.std)
    train_tf = ImageTransform(spec.mean, spec.std, crop=image_size, crop_pad=4, flip=True) if augment else test_tf
    train = None
    if with_train:
        train = TensorImageDataset(*make_synthetic(train_size, image_size, seed=1), transform=train_tf)
    test = TensorImageDataset(*make_synthetic(test_size, image_size, seed=2), transform=test_tf)
    return train, test, spec.info(train, test, "generated", image_size=image_size)


register(DatasetSpec(
    "synthetic", "generated 3×32×32 images, 10 classes (a coarse pattern per class plus per-pixel noise: "
                 "learnable), for smoke and memory runs (--synthetic-* sizes)", _build,
    num_classes=10, in_channels=3, image_size=32, mean=SYNTHETIC_MEAN, std=SYNTHETIC_STD, root="unused",
    options=(
        DatasetOption("train_size", 2048, "training images"),
        DatasetOption("test_size", 512, "test images"),
        DatasetOption("image_size", 32, "image side in pixels", metavar="S", minimum=8),
    ),
))
