"""AugLocal (Ma et al., ICLR 2024): the aux net is d new blocks shaped like uniformly sampled later blocks,
then GAP + linear; d shrinks toward the output (d_i = max(1, round(d·(1 − i·c/(K−2)) + i·c/(K−2))))."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .base import AuxContext, LocalMethod
from .registry import register

if TYPE_CHECKING:
    from torch import nn


@dataclass
class AugLocalOptions:
    """AugLocal's option (its shrink factor c is the engine's ``depth_shrink``)."""

    auglocal_depth: int = field(default=4, metadata={"help": "AugLocal aux depth d of the earliest modules (>= 1)"})

    def __post_init__(self) -> None:
        if self.auglocal_depth < 1:
            raise ValueError(f"auglocal_depth must be at least 1, got {self.auglocal_depth}")


@register
class AugLocal(LocalMethod):
    name = "auglocal"
    listing_order = 30
    aux_blocks = True
    description = "augmented local learning: fresh copies of sampled later blocks + linear probe"
    Options = AugLocalOptions
    head_options = ("depth_shrink",)  # ctx.depth

    def make_head(self, ctx: AuxContext) -> nn.Module:
        from torch import nn

        from ..heads import ClassifierLoss, StackedLoss, make_feature_classifier

        blocks, out_shape = ctx.later_blocks(ctx.depth(ctx.options.auglocal_depth))
        probe = ClassifierLoss(make_feature_classifier(ctx.classify(out_shape), ctx.num_classes, "linear"),
                               ctx.label_smoothing)
        return StackedLoss(nn.Sequential(*blocks), probe)
