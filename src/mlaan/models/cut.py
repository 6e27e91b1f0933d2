"""What a family adapter is (:class:`Adapter`), what it makes of a model (:class:`Cut`) and the list they are
registered in. Apart from :mod:`mlaan.models.adapters`, so that the families' modules can register themselves
while the adapters module imports them (no import cycle)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from . import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class Cut:
    """What an adapter makes of a model: its blocks ``[stem, …, head]`` and what they output."""

    blocks: list[nn.Module]
    feature_layout: str | None = None  # "map" or "channels_last" for 3-d outputs; None: inferred
    prefix_tokens: int | None = None  # class / register tokens before the patch tokens; None: inferred
    image_size: int | tuple[int, int] | None = None  # the size this instance was built for, if it says


@dataclass(frozen=True)
class Adapter:
    """A family: ``matches(model)``, ``cut(model) -> Cut``, and its facts (default image size, mean/std)."""

    family: str
    matches: Callable[[nn.Module], bool]
    cut: Callable[[nn.Module], Cut]
    library: str = "torch"  # "torchvision", "timm" or "torch": the prefix of its backbones' names
    image_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    layouts: tuple[str, ...] = field(default=("map",))  # the feature kinds its blocks output (documentation)
    cls: type | None = None  # the family's class: a subclass with its own forward is cut by its graph instead


_ADAPTERS: list[Adapter] = []


def register_adapter(adapter: Adapter) -> Adapter:
    """Add a family; later registrations are tried first (the generic ``nn.Sequential`` one is tried last)."""
    _ADAPTERS.insert(0, adapter)
    return adapter
