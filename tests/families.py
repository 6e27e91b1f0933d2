"""Tiny instances of every supported model family (shared by tests/test_own_models.py)."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """A hand-written ViT's stem: patches → tokens (B, N, D), with an optional class token."""

    def __init__(self, in_channels: int, dim: int, patch: int, grid: tuple[int, int], class_token: bool) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        n = grid[0] * grid[1] + (1 if class_token else 0)
        self.pos = nn.Parameter(torch.randn(1, n, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos


class MeanHead(nn.Module):
    """norm + mean over tokens + Linear."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x).mean(1))


def hand_vit(num_classes: int = 10, in_channels: int = 3, size: tuple[int, int] = (16, 16), patch: int = 4,
             depth: int = 4, dim: int = 16, class_token: bool = False) -> list[nn.Module]:
    """Patch embedding, ``nn.TransformerEncoderLayer(batch_first=True)`` blocks, norm + mean + Linear."""
    grid = (size[0] // patch, size[1] // patch)
    blocks: list[nn.Module] = [PatchEmbed(in_channels, dim, patch, grid, class_token)]
    blocks += [nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True) for _ in range(depth)]
    blocks.append(MeanHead(dim, num_classes))
    return blocks


def torchvision_models() -> dict[str, callable]:
    """Family name → builder of a tiny torchvision model (10 classes, 16-pixel images)."""
    from torchvision.models import convnext, efficientnet, mobilenetv2, mobilenetv3, regnet, resnet, vgg
    from torchvision.models import swin_transformer as swin
    from torchvision.models import vision_transformer as vit

    def vgg11_bn_tiny():
        with torch.device("meta"):
            model = vgg.VGG(nn.Sequential(), num_classes=10, init_weights=False)
        model.features = vgg.make_layers([8, "M", 16, "M", 16], batch_norm=True)
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(nn.Linear(16, 16), nn.ReLU(True), nn.Dropout(0.1), nn.Linear(16, 10))
        return model

    def vgg_plain_tiny():
        model = vgg11_bn_tiny()
        model.features = vgg.make_layers([8, "M", 16, "M", 16], batch_norm=False)
        return model

    def efficientnet_tiny():
        setting, last = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.3)
        return efficientnet.EfficientNet(setting[:3], 0.0, stochastic_depth_prob=0.0, last_channel=32, num_classes=10)

    def mobilenet_v3_tiny():
        setting, _ = mobilenetv3._mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.25)
        return mobilenetv3.MobileNetV3(setting[:3], last_channel=32, num_classes=10)

    class NarrowResNet(resnet.ResNet):
        """torchvision's ResNet with every stage 8 times narrower (its widths are not constructor arguments)."""

        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            return super()._make_layer(block, planes // 8, blocks, stride, dilate)

    def narrow_resnet(block, **kwargs):
        model = NarrowResNet(block, [1, 1, 1, 1], num_classes=10, **kwargs)
        model.fc = nn.Linear(64 * block.expansion, 10)
        return model

    return {
        "resnet": lambda: narrow_resnet(resnet.BasicBlock),
        "resnext": lambda: narrow_resnet(resnet.Bottleneck, groups=2, width_per_group=32),
        "vgg_bn": vgg11_bn_tiny,
        "vgg": vgg_plain_tiny,
        "mobilenet_v2": lambda: mobilenetv2.MobileNetV2(10, 0.25, [[1, 8, 1, 1], [6, 8, 2, 2], [6, 16, 1, 2]]),
        "mobilenet_v3": mobilenet_v3_tiny,
        "efficientnet": efficientnet_tiny,
        "regnet": lambda: regnet.RegNet(regnet.BlockParams([1, 2], [8, 16], [8, 8], [1.0, 1.0], [2, 2]),
                                        num_classes=10, stem_width=8),
        "convnext": lambda: convnext.ConvNeXt([convnext.CNBlockConfig(8, 16, 2), convnext.CNBlockConfig(16, None, 1)],
                                              num_classes=10),
        "vit": lambda: vit.VisionTransformer(16, 4, 3, 2, 16, 32, num_classes=10),
        "swin": lambda: swin.SwinTransformer([2, 2], 8, [2, 1], [1, 2], [2, 2], num_classes=10),
        "swin_v2": lambda: swin.SwinTransformer([2, 2], 8, [2, 1], [1, 2], [2, 2], num_classes=10,
                                                block=swin.SwinTransformerBlockV2,
                                                downsample_layer=swin.PatchMergingV2),
    }
