"""Your own model as a :class:`Backbone`: cut into its natural blocks (stem, residual / inverted-residual /
transformer blocks, head) by the adapter of its family, sharing its parameters.

An adapter is registered beside its facts (:func:`register_adapter`): which models it takes, how it cuts them,
what their blocks output (feature layout, prefix tokens) and the family's default image size and normalisation.
The blocks are the model's own submodules (and parameters) regrouped, never copies, so training the local model
trains the user's object, and :meth:`Backbone.export_state_dict` is the original class's ``state_dict``.
Torchvision's families live in :mod:`mlaan.models.torchvision_families`, timm's in
:mod:`mlaan.models.timm_families`; any ``nn.Sequential`` is cut here. Any other model, and a family's subclass
with its own forward (the family's blocks then are only the preferred cut points), is cut by its traced graph
(:mod:`mlaan.models.graph_cut`); a ``torch.compile`` wrapper is unwrapped first.
"""

from __future__ import annotations

from torch import nn

from .backbone import Backbone
from .cut import _ADAPTERS, Adapter, Cut, register_adapter
from .graph_cut import GraphCutError, graph_cut, unwrap_compiled

__all__ = ["Adapter", "Cut", "adapt", "adapters", "find_adapter", "group_children", "register_adapter"]


def adapters() -> list[Adapter]:
    """Registered families, most specific first."""
    _load_families()
    return list(_ADAPTERS)


def find_adapter(model: nn.Module) -> Adapter | None:
    """The adapter that takes ``model``, None when no family does."""
    return next((a for a in adapters() if a.matches(model)), None)


def own_forward(model: nn.Module, adapter: Adapter) -> bool:
    """True when ``model``'s class overrides what its family's cut relies on (``forward``, ``_forward_impl``,
    ``forward_features``, ``forward_head``): cut by its class, it would train another function. timm's own
    subclasses (DeiT distilled) keep their family's cut, whose shells run their ``forward_features``/``_head``."""
    if adapter.cls is None:
        return False
    for method in ("forward", "_forward_impl", "forward_features", "forward_head"):
        base, mine = getattr(adapter.cls, method, None), getattr(type(model), method, None)
        if base is None or mine is base:
            continue
        owner = next((c for c in type(model).__mro__ if method in vars(c)), type(model))
        if adapter.library == "timm" and method != "forward" and owner.__module__.startswith("timm."):
            continue
        return True
    return False


def _own_size(model: nn.Module) -> int | tuple[int, int] | None:
    """The image size a model says it was built for (torchvision ViT's ``image_size``, timm's
    ``patch_embed.img_size``), None when it does not say."""
    for size in (getattr(model, "image_size", None), getattr(getattr(model, "patch_embed", None), "img_size", None)):
        if isinstance(size, int) and not isinstance(size, bool) or (isinstance(size, (tuple, list)) and len(size) == 2):
            return size if isinstance(size, int) else tuple(size)
    return None


def adapt(model: nn.Module, image_size: int | tuple[int, int] | None = None, in_channels: int | None = None,
          name: str | None = None) -> Backbone:
    """``model`` cut into a :class:`Backbone` of its natural blocks, sharing its parameters.

    ``image_size`` (a side or (H, W); None: what the model was built for, else its family's default) and
    ``in_channels`` (None: read from its first convolution) describe the training images. A model of a family
    here is cut by its adapter; any other (or a family's subclass with its own forward) by its traced graph
    (:func:`mlaan.models.graph_cut.graph_cut`), at single-tensor cut points. ValueError, in one line, for a model
    with no usable cut, or when the cut misses some of its parameters."""
    model = unwrap_compiled(model)
    adapter = find_adapter(model)
    if adapter is not None and not own_forward(model, adapter):
        cut = adapter.cut(model)
        size = image_size if image_size is not None else cut.image_size if cut.image_size is not None \
            else adapter.image_size
        family = adapter.family
    else:
        prefer = None
        if adapter is not None:
            try:
                prefer = adapter.cut(model).blocks
            except Exception:  # a subclass the family's cut does not fit: no preference
                prefer = None
        size = image_size if image_size is not None else _own_size(model) or (adapter.image_size if adapter else 224)
        hw = (size, size) if isinstance(size, int) else tuple(size)
        try:
            cut = graph_cut(model, hw, in_channels, prefer)
        except GraphCutError as error:
            families = ", ".join(sorted({a.family for a in adapters()}))
            raise ValueError(f"cannot cut a {type(model).__module__}.{type(model).__name__} into blocks: supported "
                             f"are {families}, and any model whose forward torch.fx traces with a single tensor "
                             f"between blocks, but {error}; or pass your blocks as a list [stem, block, …, head]"
                             ) from None
        family = "graph"
    library = adapter.library if adapter is not None else "torch"
    prefix = f"{library}:" if library != "torch" else ""
    backbone = Backbone(cut.blocks, name=name or f"{prefix}{type(model).__name__}", image_size=size,
                        in_channels=in_channels, feature_layout=cut.feature_layout, prefix_tokens=cut.prefix_tokens,
                        source=model)
    covered = {id(t) for t in backbone.state_dict(keep_vars=True).values()}
    missing = [k for k, v in model.state_dict(keep_vars=True).items() if id(v) not in covered]
    if missing:
        raise ValueError(f"the {family} cut left {len(missing)} tensor(s) of the model out of its "
                         f"blocks, first {missing[0]}")
    return backbone


# ------------------------------------------------------------------------------------------- nn.Sequential
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def _starts_block(child: nn.Module) -> bool:
    return any(True for _ in child.parameters()) and not isinstance(child, _NORMS)


def group_children(children: list[nn.Module]) -> list[nn.Module]:
    """Children of a Sequential grouped into blocks: a new block starts at each child with parameters that is
    not a normalisation layer (a conv or linear layer, or a block of your own); the layers without weights and
    the norms that follow ride with it. One child stays itself, several become an ``nn.Sequential``."""
    groups: list[list[nn.Module]] = []
    for child in children:
        if not groups or (_starts_block(child) and any(_starts_block(c) for c in groups[-1])):
            groups.append([child])
        else:
            groups[-1].append(child)
    return [g[0] if len(g) == 1 else nn.Sequential(*g) for g in groups]


def _cut_sequential(model: nn.Module) -> Cut:
    blocks = group_children(list(model.children()))
    if len(blocks) < 2:
        raise ValueError(f"an nn.Sequential needs at least two layers with weights (a stem and a head) to be cut, "
                         f"got {len(blocks)} block(s)")
    return Cut(blocks)


def _plain_sequential(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward


_ADAPTERS.append(Adapter("nn.Sequential", _plain_sequential, _cut_sequential, image_size=32, mean=(0.0,),
                         std=(1.0,), layouts=("map", "channels_last", "tokens", "vector")))

_LOADED = False


def _load_families() -> None:
    """Import the families' modules (torchvision's always, timm's when timm is installed) once."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import timm_families, torchvision_families  # noqa: F401  (they register their adapters)
