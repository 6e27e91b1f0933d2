"""torchvision's classification families cut into their natural blocks, each adapter registered beside its facts.

Blocks are the model's own submodules: a stem, then every residual / inverted-residual / ConvNeXt / transformer
block (a stage's downsampling layer rides with the stage's first block), then the head (pooling + classifier).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models import convnext, efficientnet, mobilenetv2, mobilenetv3, regnet, resnet, swin_transformer, vgg
from torchvision.models import vision_transformer as vit

from .cut import Adapter, Cut, register_adapter


def torchvision_names() -> list[str]:
    """torchvision's classification builders (``torchvision:NAME``): a family's model is cut by its adapter, any
    other by its traced graph (:mod:`mlaan.models.graph_cut`) when the model is built, which refuses one with no
    cut in one line."""
    return list(tvm.list_models(module=tvm))


def _one(items: list[nn.Module]) -> nn.Module:
    return items[0] if len(items) == 1 else nn.Sequential(*items)


def _stage_blocks(stages: list[nn.Module], is_stage: type | tuple[type, ...]) -> list[nn.Module]:
    """The blocks of ``stages`` in order; anything between stages that is not one (a downsampling layer) rides
    with the next stage's first block, anything after the last stage becomes a block of its own."""
    blocks: list[nn.Module] = []
    pending: list[nn.Module] = []
    for item in stages:
        children = list(item.children()) if isinstance(item, nn.Sequential) else []
        if children and all(isinstance(c, is_stage) for c in children):
            blocks.append(_one([*pending, children[0]]))
            blocks.extend(children[1:])
            pending = []
        else:
            pending.append(item)
    if pending:
        blocks.append(_one(pending))
    return blocks


def _register(family: str, cls: type, cut, layouts: tuple[str, ...] = ("map",), image_size: int = 224) -> None:
    register_adapter(Adapter(family, lambda m: isinstance(m, cls), cut, library="torchvision",
                             image_size=image_size, layouts=layouts, cls=cls))


# ------------------------------------------------------------------------------------ ResNet / ResNeXt / WRN
def _cut_resnet(m: resnet.ResNet) -> Cut:
    blocks: list[nn.Module] = [nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)]
    for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
        blocks.extend(layer.children())
    blocks.append(nn.Sequential(m.avgpool, nn.Flatten(1), m.fc))
    return Cut(blocks, "map")


_register("torchvision ResNet / ResNeXt / Wide ResNet", resnet.ResNet, _cut_resnet)


# --------------------------------------------------------------------------------------------------- VGG
def _cut_vgg(m: vgg.VGG) -> Cut:
    """One block per convolution, with its BatchNorm, ReLU and the max-pool after it."""
    groups: list[list[nn.Module]] = []
    for layer in m.features:
        if isinstance(layer, nn.Conv2d) or not groups:
            groups.append([layer])
        else:
            groups[-1].append(layer)
    return Cut([*(_one(g) for g in groups), nn.Sequential(m.avgpool, nn.Flatten(1), m.classifier)], "map")


_register("torchvision VGG (with and without BN)", vgg.VGG, _cut_vgg)


# ------------------------------------------------------------------------------------- MobileNetV2 / V3
def _cut_mobilenet_v2(m: mobilenetv2.MobileNetV2) -> Cut:
    return Cut([*m.features.children(), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), m.classifier)], "map")


def _cut_mobilenet_v3(m: mobilenetv3.MobileNetV3) -> Cut:
    return Cut([*m.features.children(), nn.Sequential(m.avgpool, nn.Flatten(1), m.classifier)], "map")


_register("torchvision MobileNetV2", mobilenetv2.MobileNetV2, _cut_mobilenet_v2)
_register("torchvision MobileNetV3", mobilenetv3.MobileNetV3, _cut_mobilenet_v3)


# ------------------------------------------------------------------------------------- EfficientNet V1/V2
def _cut_efficientnet(m: efficientnet.EfficientNet) -> Cut:
    features = list(m.features.children())
    body = _stage_blocks(features[1:], (efficientnet.MBConv, efficientnet.FusedMBConv))
    return Cut([features[0], *body, nn.Sequential(m.avgpool, nn.Flatten(1), m.classifier)], "map")


_register("torchvision EfficientNet (V1, V2)", efficientnet.EfficientNet, _cut_efficientnet)


# --------------------------------------------------------------------------------------------------- RegNet
def _cut_regnet(m: regnet.RegNet) -> Cut:
    blocks: list[nn.Module] = [m.stem]
    for stage in m.trunk_output.children():
        blocks.extend(stage.children())
    blocks.append(nn.Sequential(m.avgpool, nn.Flatten(1), m.fc))
    return Cut(blocks, "map")


_register("torchvision RegNet", regnet.RegNet, _cut_regnet)


# ------------------------------------------------------------------------------------------------- ConvNeXt
def _cut_convnext(m: convnext.ConvNeXt) -> Cut:
    features = list(m.features.children())
    body = _stage_blocks(features[1:], convnext.CNBlock)
    return Cut([features[0], *body, nn.Sequential(m.avgpool, m.classifier)], "map")


_register("torchvision ConvNeXt", convnext.ConvNeXt, _cut_convnext)


# ------------------------------------------------------------------------------------------------ Swin V1/V2
def _cut_swin(m: swin_transformer.SwinTransformer) -> Cut:
    features = list(m.features.children())
    kinds = (swin_transformer.SwinTransformerBlock, swin_transformer.SwinTransformerBlockV2)
    body = _stage_blocks(features[1:], kinds)
    head = nn.Sequential(m.norm, m.permute, m.avgpool, m.flatten, m.head)
    return Cut([features[0], *body, head], "channels_last")


_register("torchvision Swin (V1, V2)", swin_transformer.SwinTransformer, _cut_swin, ("channels_last",))


# --------------------------------------------------------------------------------------- VisionTransformer
class ViTStem(nn.Module):
    """torchvision ViT's input side: patch projection, class token, position embedding, dropout → tokens
    (B, 1 + N, D). Holds the model's own ``conv_proj``, ``class_token`` and ``encoder.pos_embedding``."""

    def __init__(self, model: vit.VisionTransformer) -> None:
        super().__init__()
        self.conv_proj = model.conv_proj
        self.class_token = model.class_token
        self.pos_embedding = model.encoder.pos_embedding
        self.dropout = model.encoder.dropout
        self.hidden_dim = model.hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x)
        n = x.shape[0]
        x = x.reshape(n, self.hidden_dim, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class ViTHead(nn.Module):
    """torchvision ViT's output side: the encoder's final LayerNorm, the class token, the classifier."""

    def __init__(self, model: vit.VisionTransformer) -> None:
        super().__init__()
        self.ln = model.encoder.ln
        self.heads = model.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.ln(x)[:, 0])


def _cut_vit(m: vit.VisionTransformer) -> Cut:
    return Cut([ViTStem(m), *m.encoder.layers.children(), ViTHead(m)], prefix_tokens=1, image_size=m.image_size)


_register("torchvision VisionTransformer", vit.VisionTransformer, _cut_vit, ("tokens",))


# ------------------------------------------------------------------------------------------- by name
def build(name: str, num_classes: int, in_channels: int, image_size: int | tuple[int, int]) -> nn.Module:
    """torchvision's ``name`` (random init) for ``num_classes`` and ``in_channels``-channel images; a ViT is
    built for ``image_size`` (square). ValueError for a name :func:`torchvision_names` does not list."""
    if name not in torchvision_names():
        raise ValueError(f"unknown or unsupported torchvision model {name!r}; supported: "
                         f"{', '.join(torchvision_names())}")
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if name.startswith("vit_"):
        side = image_size if isinstance(image_size, int) else image_size[0]
        if not isinstance(image_size, int) and image_size[0] != image_size[1]:
            raise ValueError(f"torchvision's {name} takes square images only, got image_size={tuple(image_size)}")
        kwargs["image_size"] = side
    elif name.startswith("maxvit_"):  # built for its input size
        kwargs["input_size"] = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    elif name in ("googlenet", "inception_v3"):  # one output in train() (no auxiliary logits), torchvision's init
        kwargs.update(aux_logits=False, init_weights=True)
    model = tvm.get_model(name, **kwargs)
    if in_channels != 3:
        replace_first_conv(model, in_channels)
    return model


def replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the first Conv2d of ``model`` by a fresh one taking ``in_channels`` channels (same other
    arguments, default init)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, child_name, nn.Conv2d(
                    in_channels, child.out_channels, child.kernel_size, child.stride, child.padding, child.dilation,
                    child.groups, child.bias is not None, child.padding_mode))
                return
    raise ValueError(f"{type(model).__name__} has no Conv2d whose input channels could be changed")
