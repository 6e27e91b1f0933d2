"""Backbone registry, timm style: ``create(name, **kw)`` and ``available()``.

Every model is a :class:`Backbone` (stem, residual blocks, head) so that the engine can split it anywhere.
Besides the registered names, ``torchvision:NAME`` and ``timm:NAME`` build that library's model and cut it
(:func:`adapt`, :mod:`mlaan.models.adapters`); each entry carries its defaults (:func:`defaults`: image size,
normalisation, K), like timm's pretrained configs.

The registry imports no torch: the architectures' modules (and torch, torchvision, timm) are imported when a
model is built or one of their classes is asked for, so ``mlaan --help`` lists the names without them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..lazy import lazy_exports
from ..names import registered_spelling, unknown
from .vit import VIT_SPECS

if TYPE_CHECKING:
    from .adapters import adapt, adapters
    from .backbone import Backbone, ClassifierHead
    from .cifar_resnet import BasicBlock

__all__ = ["ArchDefaults", "Backbone", "BasicBlock", "ClassifierHead", "adapt", "adapters", "available",
           "check_arch", "create", "default_local_modules", "defaults", "library_names", "max_local_modules",
           "register"]

# torchvision's ImageNet normalisation (the libraries' models' default)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CLASSES = {"Backbone": "backbone", "ClassifierHead": "backbone", "BasicBlock": "cifar_resnet",
            "adapt": "adapters", "adapters": "adapters"}


def _lazy(module: str, function: str, *args: Any) -> Callable[..., Backbone]:
    """``function(*args, **kwargs)`` of this package's ``module``, imported when a model is built."""

    def factory(**kwargs: Any) -> Backbone:
        return getattr(importlib.import_module(f".{module}", __name__), function)(*args, **kwargs)

    return factory


__getattr__ = lazy_exports(__name__, _CLASSES)


_REGISTRY: dict[str, Callable[..., Backbone]] = {}
_DEFAULT_K: dict[str, int | None] = {}
_DEFAULTS: dict[str, ArchDefaults] = {}
LIBRARIES = ("torchvision", "timm")  # prefixes of ``LIBRARY:NAME`` architectures


@dataclass(frozen=True)
class ArchDefaults:
    """What an architecture is trained with unless told otherwise: image side, normalisation (of its
    pretrained weights, where it has some) and K (None: one module per block)."""

    image_size: int = 32
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    local_modules: int | None = None


def _registered_name(name: object) -> str | None:
    """The registered spelling of ``name`` in any case (``ResNet20`` → ``resnet20``), like method names; None for
    an unregistered name."""
    return registered_spelling(name, _REGISTRY)


def register(name: str, factory: Callable[..., Backbone], default_k: int | None = None,
             image_size: int = 32, mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,)) -> None:
    """Add an architecture; ``factory(num_classes=, in_channels=, image_size=)`` returns a Backbone.
    ``default_k``: the K a local method gets when none is given (None: one module per residual block);
    ``image_size``, ``mean``, ``std``: its defaults (:func:`defaults`). Names are looked up case-insensitively,
    so ValueError for one that differs from a registered name only in case."""
    taken = _registered_name(name)
    if taken is not None and taken != name:
        raise ValueError(f"architecture name {name!r} clashes with the registered {taken!r} (names ignore case)")
    _REGISTRY[name] = factory
    _DEFAULT_K[name] = default_k
    _DEFAULTS[name] = ArchDefaults(image_size, tuple(mean), tuple(std), default_k)


# Default K: the paper's where it has one (ResNet-32 K=16 and ResNet-110 K=55, every block its own module;
# ImageNet ResNet-34 and -101 as in configs/imagenet_*.yaml), otherwise the same rule, one module per block.
_PAPER_K = {"resnet32": 16, "resnet110": 55, "resnet34": 16, "resnet101": 33}
_IMAGENET_BLOCKS = {"resnet18": 8, "resnet34": 16, "resnet50": 16, "resnet101": 33, "resnet152": 50}
for _depth in (20, 32, 44, 56, 110):
    register(f"resnet{_depth}", _lazy("cifar_resnet", "cifar_resnet", _depth),
             _PAPER_K.get(f"resnet{_depth}", (_depth - 2) // 2 + 1))
for _name, _blocks in _IMAGENET_BLOCKS.items():
    register(_name, _lazy("imagenet_resnet", "imagenet_resnet", _name), _PAPER_K.get(_name, _blocks + 1),
             image_size=224,
             mean=IMAGENET_MEAN, std=IMAGENET_STD)
# Small ViTs for 32-pixel images (timm's VisionTransformer, needs timm; their facts: mlaan.models.vit.VIT_SPECS)
for _name, _spec in VIT_SPECS.items():
    register(_name, _lazy("vit", "small_vit", _name), _spec.local_modules, image_size=_spec.image_size)


def _split_library(name: str) -> tuple[str, str] | None:
    """(library, model) of ``LIBRARY:NAME`` (the prefix in any case), None for another name."""
    library, sep, model = name.strip().partition(":")
    return (library.lower(), model) if sep and library.lower() in LIBRARIES else None


def library_names(library: str) -> list[str]:
    """The model names ``LIBRARY:NAME`` takes for ``library`` in :data:`LIBRARIES` (empty for timm when it is
    not installed)."""
    if library == "torchvision":
        from .torchvision_families import torchvision_names

        return torchvision_names()
    if library == "timm":
        from .timm_families import timm_names

        return timm_names()
    raise ValueError(f"unknown model library {library!r}; allowed: {', '.join(LIBRARIES)}")


def check_arch(name: str) -> str:
    """The canonical spelling of architecture ``name``, the one recorded in configs and output folders: a
    registered name in any case as registered (``ResNet20`` → ``resnet20``), a ``torchvision:NAME`` lower-cased
    (torchvision's ``get_model`` ignores case too), a ``timm:NAME`` as given (timm's names are case-sensitive).
    ValueError, one line, unless it is registered or a supported library model (the library's own list)."""
    registered = _registered_name(name)
    if registered is not None:
        return registered
    split = _split_library(name) if isinstance(name, str) else None
    if split is None:
        raise ValueError(unknown("architecture", name, available()) + ", or torchvision:NAME / timm:NAME")
    library, model = split
    if library == "timm":
        from .timm_families import timm

        if timm is None:
            raise ValueError(f"architecture {name!r} needs timm: pip install 'mlaan[timm]'")
    else:
        model = model.lower()
    names = library_names(library)
    if model not in names:
        raise ValueError(f"unknown or unsupported {library} model {model!r} in {name!r}; "
                         f"{_listing(model, names, library)}")
    return f"{library}:{model}"


def _listing(model: str, names: list[str], library: str, at_most: int = 80) -> str:
    """The supported names, all of them when few (torchvision's), else the closest to ``model`` (timm has
    hundreds)."""
    if len(names) <= at_most:
        return f"supported: {', '.join(names)}"
    import difflib

    close = difflib.get_close_matches(model, names, n=8, cutoff=0.5)
    shown = f"closest supported: {', '.join(close)}; " if close else ""
    return f"{shown}{len(names)} in all (mlaan.models.library_names({library!r}) lists them)"


def defaults(name: str) -> ArchDefaults:
    """The defaults of architecture ``name`` (registered or ``LIBRARY:NAME``); ValueError for an unknown one."""
    name = check_arch(name)
    if name in _DEFAULTS:
        return _DEFAULTS[name]
    if name.startswith("timm:"):
        from .timm_families import timm

        cfg = timm.models.get_pretrained_cfg(name.partition(":")[2])
        if cfg is not None:
            return ArchDefaults(cfg.input_size[-1], tuple(cfg.mean), tuple(cfg.std))
    return ArchDefaults(224, IMAGENET_MEAN, IMAGENET_STD)


def default_local_modules(name: str) -> int:
    """K for a local method on architecture ``name`` when none is given (see ``register``)."""
    name = check_arch(name)
    k = _DEFAULT_K.get(name)
    return k if k is not None else max_local_modules(name)


def max_local_modules(name: str) -> int:
    """The largest K architecture ``name`` can be split into: its residual blocks + the stem's module."""
    import torch

    try:
        with torch.device("meta"):  # only the blocks are counted: no memory, no initialisation
            return create(name).num_residual_blocks + 1
    except NotImplementedError:  # a builder that reads tensor values (torchvision RegNet's widths): built for real
        return create(name).num_residual_blocks + 1


def available() -> list[str]:
    """Registered names accepted by :func:`create` (which also takes ``torchvision:NAME`` and ``timm:NAME``,
    :func:`library_names`)."""
    return list(_REGISTRY)


def is_imagenet_arch(name: str) -> bool:
    """True for torchvision's ImageNet ResNets (224-pixel inputs, max-pool stem)."""
    return name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def create(name: str, num_classes: int = 10, in_channels: int = 3,
           image_size: int | tuple[int, int] | None = None) -> Backbone:
    """Build architecture ``name`` (registered, or ``torchvision:NAME`` / ``timm:NAME`` cut by :func:`adapt`);
    ``image_size`` (a side or (H, W)) defaults to the entry's (:func:`defaults`: 224 for ImageNet nets and the
    libraries' models, 32 otherwise). Batches of another size are resized to it (bilinear, in forward) for a
    library's model, and for a registered one when ``image_size`` is given (``mlaan train --image-size``; the
    fully convolutional registered nets otherwise take any size as it comes). ValueError for an unknown name or
    bad sizes. ``name`` is taken in any case (:func:`check_arch`)."""
    name = check_arch(name)
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    chosen_size = image_size is not None
    if image_size is None:
        image_size = defaults(name).image_size
    split = _split_library(name)
    if split is not None:
        library, model_name = split
        if library == "torchvision":
            from .torchvision_families import build
        else:
            from .timm_families import build
        model = build(model_name, num_classes, in_channels, image_size)
        from .adapters import adapt

        backbone = adapt(model, image_size=image_size, in_channels=in_channels, name=name)
        backbone.resize_inputs = True  # built for image_size, trained on a data set of any size
        return backbone
    backbone = _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    backbone.resize_inputs = backbone.resize_inputs or chosen_size
    return backbone
