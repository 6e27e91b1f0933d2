"""torchvision's ImageNet ResNets, flattened into stem + residual blocks + head."""

from __future__ import annotations

from torch import nn
from torchvision import models as tv_models

from .backbone import Backbone, ClassifierHead


def imagenet_resnet(
    name: str, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224
) -> Backbone:
    """Build torchvision's ``name`` (random init) and re-express it as a block list.

    The stem keeps torchvision's conv–BN–ReLU–max-pool; only ``conv1`` is replaced when ``in_channels`` ≠ 3.
    """
    net = getattr(tv_models, name)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    blocks: list[nn.Module] = [stem]
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        blocks.extend(layer.children())
    head = ClassifierHead(net.fc.in_features, num_classes)
    head[2] = net.fc  # keep torchvision's initialisation of the classifier
    blocks.append(head)
    return Backbone(blocks, name=name, image_size=image_size)
