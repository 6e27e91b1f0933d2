"""The paper's augmentations and normalisations (torchvision's transforms v2, imported when one is built)."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def train_transform(
    size: int, pad: int, flip: bool, mean: Sequence[float], std: Sequence[float], padding_mode: str = "reflect"
) -> Callable:
    """Random ``size``×``size`` crop of the ``pad``-padded image, a horizontal flip when ``flip``, then scaling to
    [0, 1] and normalisation."""
    import torch
    from torchvision.transforms import v2

    steps = [v2.ToImage(), v2.RandomCrop(size, padding=pad, padding_mode=padding_mode)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def eval_transform(
    mean: Sequence[float], std: Sequence[float], resize: int | None = None, crop: int | None = None
) -> Callable:
    """Optional resize (shorter side) and centre crop, then scaling to [0, 1] and normalisation."""
    import torch
    from torchvision.transforms import v2

    steps = [v2.ToImage()]
    if resize is not None:
        steps.append(v2.Resize(resize, antialias=True))
    if crop is not None:
        steps.append(v2.CenterCrop(crop))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def resized_crop_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """ImageNet's training augmentation: a random resized ``size``×``size`` crop and a horizontal flip, then
    scaling to [0, 1] and normalisation."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
