"""timm models cut through their stages / blocks (the optional extra ``pip install mlaan[timm]``).

A timm model computes ``forward_head(post(body(pre(x))))``: ``pre`` (stem, patch embedding, position
embedding), a ``body`` of blocks or stages, ``post`` (a final norm or 1×1 conv) and its head. The stem block is
a shell of the model whose body, post and head are identities, so its own ``forward_features`` does exactly
what the model does before its blocks (class / register / distillation tokens included); the head block runs
``post`` and a shell whose ``forward_head`` is the model's. Shells hold the model's own submodules and
parameters. Nothing here is registered unless timm imports.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from .cut import Adapter, Cut, register_adapter

try:  # the optional extra
    import timm
    from timm.models import convnext, efficientnet, resnet, swin_transformer, vision_transformer
except ImportError:  # pragma: no cover - exercised where timm is absent
    timm = None

# module of timm's model registry → (model class, body attribute names, post attribute names, layout)
_FAMILIES: dict[str, tuple] = {}
if timm is not None:
    _FAMILIES = {
        "vision_transformer": (vision_transformer.VisionTransformer, ("blocks",), ("norm",), None),
        "deit": (vision_transformer.VisionTransformer, ("blocks",), ("norm",), None),
        "resnet": (resnet.ResNet, ("layer1", "layer2", "layer3", "layer4"), (), "map"),
        "convnext": (convnext.ConvNeXt, ("stages",), ("norm_pre",), "map"),
        "swin_transformer": (swin_transformer.SwinTransformer, ("layers",), ("norm",), "channels_last"),
        "efficientnet": (efficientnet.EfficientNet, ("blocks",), ("conv_head", "bn2"), "map"),
    }


def timm_names() -> list[str]:
    """timm's model names (``timm:NAME``); empty without timm. A family's model here is cut through its blocks,
    any other by its traced graph (:mod:`mlaan.models.graph_cut`) when the model is built, which refuses one with
    no cut in one line."""
    if timm is None:
        return []
    return sorted(timm.list_models())


def _shell(model: nn.Module, identity: set[str], keep_tensors: bool) -> nn.Module:
    """A shallow instance of ``model``'s class sharing its submodules, with the children named in ``identity``
    replaced by ``nn.Identity`` and, unless ``keep_tensors``, without its own top-level parameters and buffers."""
    shell = copy.copy(model)
    for name, value in list(vars(model).items()):
        if name.endswith("hooks") and isinstance(value, dict):
            setattr(shell, name, OrderedDict(value))  # hooks registered on the shell stay the shell's
    shell._modules = {k: (nn.Identity() if k in identity else v) for k, v in model._modules.items()}
    shell._parameters = dict(model._parameters) if keep_tensors else {}
    shell._buffers = dict(model._buffers) if keep_tensors else {}
    shell._non_persistent_buffers_set = set(model._non_persistent_buffers_set) if keep_tensors else set()
    return shell


class TimmStem(nn.Module):
    """The model's ``forward_features`` up to its blocks (a shell whose blocks, post and head are identities)."""

    def __init__(self, shell: nn.Module) -> None:
        super().__init__()
        self.shell = shell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shell.forward_features(x)


class TimmHead(nn.Module):
    """The model's last norm / conv after its blocks (``post``), then its ``forward_head``."""

    def __init__(self, post: list[nn.Module], shell: nn.Module) -> None:
        super().__init__()
        self.post = nn.Sequential(*post)
        self.shell = shell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shell.forward_head(self.post(x))


def _body_blocks(container: nn.Module) -> list[nn.Module]:
    """Blocks of a body container: a stage with ``downsample`` + ``blocks`` gives its blocks (the downsampling
    riding with the first), a plain Sequential of Sequentials (EfficientNet's stages) their children."""
    blocks: list[nn.Module] = []
    for item in container.children():
        inner = getattr(item, "blocks", None)
        if isinstance(inner, nn.Sequential) and len(inner) > 0:
            down = getattr(item, "downsample", None)
            first = inner[0] if down is None or isinstance(down, nn.Identity) else nn.Sequential(down, inner[0])
            blocks.extend([first, *list(inner)[1:]])
        elif type(item) is nn.Sequential:
            blocks.extend(item.children())
        else:
            blocks.append(item)
    return blocks


def _cut(model: nn.Module, body: tuple[str, ...], post: tuple[str, ...], layout: str | None) -> Cut:
    names = list(model._modules)
    first_body = min(names.index(b) for b in body)
    pre = set(names[:first_body])
    head_names = set(names) - pre - set(body) - set(post)
    stem = TimmStem(_shell(model, set(body) | set(post) | head_names, keep_tensors=True))
    head = TimmHead([getattr(model, p) for p in post], _shell(model, pre | set(body) | set(post), keep_tensors=False))
    blocks: list[nn.Module] = []
    for name in body:
        container = getattr(model, name)
        blocks.extend(_body_blocks(container) if len(body) == 1 else container.children())
    prefix = getattr(model, "num_prefix_tokens", None)
    patch = getattr(model, "patch_embed", None)
    size = getattr(patch, "img_size", None)
    return Cut([stem, *blocks, head], layout, prefix, tuple(size) if size is not None else None)


def _adapter(module: str) -> Adapter:
    cls, body, post, layout = _FAMILIES[module]
    return Adapter(f"timm {cls.__name__} ({module})", lambda m: isinstance(m, cls),
                   lambda m: _cut(m, body, post, layout), library="timm",
                   layouts=(layout,) if layout else ("tokens",), cls=cls)


for _module in _FAMILIES:
    if _module != "deit":
        register_adapter(_adapter(_module))


def build(name: str, num_classes: int, in_channels: int, image_size: int | tuple[int, int] | None) -> nn.Module:
    """timm's ``name`` (random init) for ``num_classes`` and ``in_channels``; transformers built for
    ``image_size`` where the model takes an ``img_size``. ValueError without timm or for a name :func:`timm_names`
    does not list."""
    if timm is None:
        raise ValueError("timm:NAME models need timm: pip install 'mlaan[timm]'")
    if name not in timm_names():
        raise ValueError(f"unknown timm model {name!r}; timm.list_models() lists them")
    kwargs: dict = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels}
    if image_size is None:
        return timm.create_model(name, **kwargs)
    try:  # built for image_size where the model takes one (transformers, MLP-Mixer, LeViT, ...)
        return timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError as error:
        if "img_size" not in str(error):
            raise
    return timm.create_model(name, **kwargs)  # a convolutional net: any size
