"""Image data sets held in memory as tensors (Fashion-MNIST, synthetic)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset


class TensorImageDataset(Dataset):
    """Images held in memory as a uint8 tensor N×C×H×W, labels as int64; ``transform`` maps a uint8 C×H×W
    tensor to the model's input."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 N×C×H×W tensor, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels.long(), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
