"""The paper's augmentations and normalisations (torchvision's transforms v2, imported when one is built)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


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


@dataclass(frozen=True)
class ImageTransform:
    """The one description of an in-memory data set's per-image pipeline — zero padding ``pre_pad`` (Fashion-MNIST's
    28 → 32), then for training a random ``crop``×``crop`` crop of the ``crop_pad``-padded image and a horizontal
    flip when ``flip``, then scaling to [0, 1] and normalisation by ``mean``/``std`` — usable two ways:

    * called on one uint8 C×H×W tensor, it is the torchvision v2 transform above (the DataLoader path; random
      numbers from the global generator, as every torchvision transform);
    * :meth:`batch` applies the same pipeline to a whole uint8 batch on any device at once, drawing its crops and
      flips from ``generator`` (``mlaan train --data-on-device``).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    pre_pad: int = 0
    crop: int | None = None
    crop_pad: int = 0
    padding_mode: str = "reflect"
    flip: bool = False

    @functools.cached_property
    def _per_image(self) -> Callable:
        from torchvision.transforms import v2

        if self.crop is not None:
            steps = train_transform(self.crop, self.crop_pad, self.flip, self.mean, self.std, self.padding_mode)
        else:
            steps = eval_transform(self.mean, self.std)
        return v2.Compose([v2.Pad(self.pre_pad), steps]) if self.pre_pad else steps

    def __call__(self, image: Any) -> Any:
        return self._per_image(image)

    @property
    def random(self) -> bool:
        """Whether the pipeline draws random numbers (a training crop or flip)."""
        return self.crop is not None or self.flip

    def batch(self, images: Any, generator: Any = None) -> Any:
        """``images`` (B, C, H, W) uint8 on any device → (B, C, S, S) float32 normalised, on the same device.

        Each image gets its own crop offset (uniform over the padded image, as ``v2.RandomCrop``) and flip
        (probability 1/2), drawn from ``generator`` (a ``torch.Generator`` on the images' device; needed when
        :attr:`random`). Bit-identical to the per-image transform for the same draws (tested)."""
        import torch
        import torch.nn.functional as F

        x = images.to(torch.float32)
        if self.pre_pad:
            x = F.pad(x, (self.pre_pad,) * 4)
        if self.crop is not None:
            x = _random_crops(x, self.crop, self.crop_pad, self.padding_mode, generator)
        if self.flip:
            flipped = torch.rand(len(x), generator=generator, device=x.device) < 0.5
            x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x.mul(1 / 255).sub(mean).div(std)  # torchvision's own arithmetic, so the result is bit-identical


def _random_crops(x: Any, size: int, pad: int, padding_mode: str, generator: Any) -> Any:
    """A ``size``×``size`` window of each ``pad``-padded image of ``x`` (B, C, H, W), at offsets drawn uniformly."""
    import torch
    import torch.nn.functional as F

    if pad:
        x = F.pad(x, (pad,) * 4, mode=padding_mode)
    n, _, height, width = x.shape
    top = torch.randint(0, height - size + 1, (n,), generator=generator, device=x.device)
    left = torch.randint(0, width - size + 1, (n,), generator=generator, device=x.device)
    window = torch.arange(size, device=x.device)
    rows = (top[:, None] + window)[:, :, None]  # (B, size, 1)
    cols = (left[:, None] + window)[:, None, :]  # (B, 1, size)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, C) gathered, back to (B, C, ...)
