"""CIFAR-style ResNets (He et al. 2016): 3 stages of BasicBlocks, widths 16/32/64, depth 6n+2."""

from __future__ import annotations

import torch
from torch import nn

from .backbone import Backbone, ClassifierHead


class BasicBlock(nn.Module):
    """Two 3×3 conv–BN layers with an identity (or 1×1 conv–BN projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> Backbone:
    """ResNet-``depth`` for small images: stem + 3·n BasicBlocks + head, n = (depth − 2) / 6."""
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
    per_stage = (depth - 2) // 6
    stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
    blocks: list[nn.Module] = [stem]
    width = 16
    for stage, stage_width in enumerate((16, 32, 64)):
        for i in range(per_stage):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(BasicBlock(width, stage_width, stride))
            width = stage_width
    blocks.append(ClassifierHead(width, num_classes))
    backbone = Backbone(blocks, name=f"resnet{depth}", image_size=image_size)
    _init_weights(backbone)
    return backbone


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
