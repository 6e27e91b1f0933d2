"""Backbone registry, timm style: ``create(name, **kw)`` and ``available()``.

Every model is a :class:`Backbone` (stem, residual blocks, head) so that the engine can split it anywhere.
The registry imports no torch: the built-in architectures' modules (and torch, torchvision) are imported when
a model is built or one of their classes is asked for, so ``mlaan --help`` lists the names without them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backbone import Backbone, ClassifierHead
    from .cifar_resnet import BasicBlock

__all__ = ["Backbone", "BasicBlock", "ClassifierHead", "available", "create", "default_local_modules", "register"]

_REGISTRY: dict[str, Callable[..., Backbone]] = {}
_DEFAULT_K: dict[str, int | None] = {}


def register(name: str, factory: Callable[..., Backbone], default_k: int | None = None) -> None:
    """Add an architecture; ``factory(num_classes=, in_channels=, image_size=)`` returns a Backbone.
    ``default_k``: the K a local method gets when none is given (None: one module per residual block)."""
    _REGISTRY[name] = factory
    _DEFAULT_K[name] = default_k


# Default K: the paper's where it has one (ResNet-32 K=16 and ResNet-110 K=55, every block its own module;
# ImageNet ResNet-34 and -101 as in configs/imagenet_*.yaml), otherwise the same rule, one module per block.
_PAPER_K = {"resnet32": 16, "resnet110": 55, "resnet34": 16, "resnet101": 33}
_IMAGENET_BLOCKS = {"resnet18": 8, "resnet34": 16, "resnet50": 16, "resnet101": 33, "resnet152": 50}
_CLASSES = {"Backbone": "backbone", "ClassifierHead": "backbone", "BasicBlock": "cifar_resnet"}


def _lazy(module: str, function: str, *args: Any) -> Callable[..., Backbone]:
    """``function(*args, **kwargs)`` of this package's ``module``, imported when a model is built."""

    def factory(**kwargs: Any) -> Backbone:
        return getattr(importlib.import_module(f".{module}", __name__), function)(*args, **kwargs)

    return factory


for _depth in (20, 32, 44, 56, 110):
    register(f"resnet{_depth}", _lazy("cifar_resnet", "cifar_resnet", _depth),
             _PAPER_K.get(f"resnet{_depth}", (_depth - 2) // 2 + 1))
for _name, _blocks in _IMAGENET_BLOCKS.items():
    register(_name, _lazy("imagenet_resnet", "imagenet_resnet", _name), _PAPER_K.get(_name, _blocks + 1))


def __getattr__(name: str) -> Any:
    """``Backbone``, ``ClassifierHead`` and ``BasicBlock``, imported (with torch) when first asked for."""
    if name in _CLASSES:
        return getattr(importlib.import_module(f".{_CLASSES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_local_modules(name: str) -> int:
    """K for a local method on architecture ``name`` when none is given (see ``register``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; available: {', '.join(available())}")
    k = _DEFAULT_K[name]
    return k if k is not None else create(name).num_residual_blocks + 1


def available() -> list[str]:
    """Names accepted by :func:`create`."""
    return list(_REGISTRY)


def is_imagenet_arch(name: str) -> bool:
    """True for torchvision's ImageNet ResNets (224-pixel inputs, max-pool stem)."""
    return name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def create(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int | None = None) -> Backbone:
    """Build architecture ``name``; ``image_size`` defaults to 224 for ImageNet nets, 32 otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; available: {', '.join(available())}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if image_size is None:
        image_size = 224 if is_imagenet_arch(name) else 32
    return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)
