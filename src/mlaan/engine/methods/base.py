"""What a local-learning method is: a small object with one hook, ``make_head``.

The engine asks the method for the auxiliary head of each local module (and, under LAM, for the head that
follows the copied later blocks). Everything else — the split, cascades, EMA twins, the backward schedule —
is the engine's, so a new method is one file that subclasses :class:`LocalMethod`, registers itself with
``@register`` and declares its options as a dataclass assigned to ``Options`` (see docs/API.md, "Adding a method").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # a method's declaration imports no torch: ``mlaan --help`` lists methods and their options
    from torch import nn

    from ..features import FeatureKind


@dataclass
class AuxContext:
    """What a method needs to know to build the auxiliary head of one local module."""

    module_index: int  # 0-based index of the supervised local module
    num_modules: int  # K
    feature_shape: tuple[int, ...]  # shape (no batch dim) of the features the head receives; see feature_kind
    num_classes: int
    image_shape: tuple[int, int, int]
    # a mlaan.engine.options.HeadOptions (not imported: options.py imports the method registry): read-only, the
    # method's own options and the engine options it lists in ``head_options`` (``options.<field>``)
    options: Any
    # Fresh (re-initialised) copies of sampled later backbone blocks, shape-chained, for methods whose aux net
    # is made of backbone-like blocks (AugLocal): ``later_blocks(depth) -> (blocks, output feature shape)``.
    later_blocks: Callable[[int], tuple[list[nn.Module], tuple[int, ...]]]
    # The feature kind of a shape (the backbone's declared layout and prefix tokens applied); None: inferred from
    # the shape and the image size alone (mlaan.engine.features.classify).
    kind_of: Callable[[tuple[int, ...]], FeatureKind] | None = None
    # The engine option ``label_smoothing``: what a head's cross-entropy on class-index targets smooths by (pass it
    # to mlaan.engine.heads.cross_entropy, as the built-in heads do). Targets reach a head as the user passed them:
    # class indices (B,) or probabilities (B, num_classes).
    label_smoothing: float = 0.0

    @property
    def feature_kind(self) -> FeatureKind:
        """What the head receives: a (C, H, W) map, an (H, W, C) map, (N, D) tokens or a (D,) vector."""
        return self.classify(self.feature_shape)

    def classify(self, shape: tuple[int, ...]) -> FeatureKind:
        """The feature kind of another shape of this backbone (e.g. the output of ``later_blocks``)."""
        if self.kind_of is not None:
            return self.kind_of(tuple(shape))
        from ..features import classify  # torch: method declarations are read by ``mlaan --help`` without it

        return classify(tuple(shape), tuple(self.image_shape[1:]))

    def interpolate(self, pair: tuple[float, float]) -> float:
        """Linear in the module index over the modules with an aux net: ``pair[0]`` at the first (j = 0),
        ``pair[1]`` at the last (j = K−2; METHOD.md §2 "at module K−1", counting from 1; InfoPro's official
        ``local_module_i / (local_module_num − 2)``)."""
        if self.num_modules <= 2:
            return pair[0]
        t = self.module_index / (self.num_modules - 2)
        return pair[0] + (pair[1] - pair[0]) * t

    def depth(self, depth: int, shrink: float | None = None) -> int:
        """AugLocal's schedule: d_i = max(1, round(d·(1 − i·c/(K−2)) + i·c/(K−2))), c = ``shrink``."""
        c = self.options.depth_shrink if shrink is None else shrink
        if self.num_modules <= 2:
            return depth
        r = self.module_index * c / (self.num_modules - 2)
        return max(1, int(depth * (1 - r) + r + 0.5))


class LocalMethod:
    """Base class; subclasses set ``name``/``description``, implement :meth:`make_head` and may declare options.

    ``Options``: a dataclass whose fields (each with a default and ``metadata={"help": ...}``) are this method's
    options; its ``__post_init__`` checks them (ValueError). They become keyword options of
    ``create_local_model``, flags of ``mlaan train`` (``--field-name``) and config keys, and ``make_head`` reads
    them as ``ctx.options.<field>``. Option names are shared by all methods, so prefix them with the method's
    name unless they mean the same everywhere.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    end_to_end: ClassVar[bool] = False  # True for BP: a single module, no auxiliary heads
    listing_order: ClassVar[int] = 100  # position in help texts and error messages (baselines first)
    aux_blocks: ClassVar[bool] = False  # True when the aux net stacks backbone-like blocks (AugLocal)
    # The engine options (``mlaan.engine.options.EngineOptions`` fields read by "head") that make_head reads as
    # ``ctx.options.<name>``, ``ctx.depth`` included; a method that does not list one is not given it on resume.
    head_options: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type | None] = None  # a dataclass of this method's options, or None

    def make_head(self, ctx: AuxContext) -> nn.Module:
        """Return a module called as ``head(features, images, targets) -> scalar loss``."""
        raise NotImplementedError
