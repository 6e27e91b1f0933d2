"""A backbone as the engine sees it: an ordered list of blocks (stem, residual blocks, head).

Keeping the network a flat ``nn.ModuleList`` is what lets the engine cut it anywhere: a split into local
modules is just a list of index ranges, and the plain backbone's ``state_dict`` stays loadable into an
ordinary model of the same architecture (keys are ``blocks.<i>.…``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ClassifierHead(nn.Sequential):
    """Global average pooling, flatten, linear: the head every ResNet here ends with."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_features, num_classes))


class Backbone(nn.Module):
    """``blocks[0]`` is the stem, ``blocks[1:-1]`` the residual blocks, ``blocks[-1]`` the head."""

    def __init__(self, blocks: Sequence[nn.Module], name: str = "custom", image_size: int = 32) -> None:
        super().__init__()
        if len(blocks) < 2:
            raise ValueError(f"a backbone needs at least a stem and a head, got {len(blocks)} block(s)")
        self.blocks = nn.ModuleList(blocks)
        self.name = name
        self.image_size = image_size

    @property
    def num_residual_blocks(self) -> int:
        """Blocks between stem and head; a split may have 1 to this + 1 modules."""
        return len(self.blocks) - 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x
