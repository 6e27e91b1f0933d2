"""DGL (Belilovsky et al., ICML 2020): each module trained by a small auxiliary classifier's cross-entropy."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import AuxContext, LocalMethod
from .registry import register

if TYPE_CHECKING:
    from torch import nn


@register
class DGL(LocalMethod):
    name = "dgl"
    listing_order = 10
    description = "decoupled greedy learning: auxiliary classifier + cross-entropy"
    head_options = ("aux_head", "aux_width")

    def make_head(self, ctx: AuxContext) -> nn.Module:
        from ..heads import ClassifierLoss, make_feature_classifier

        opts = ctx.options
        return ClassifierLoss(make_feature_classifier(ctx.feature_kind, ctx.num_classes, opts.aux_head, opts.aux_width),
                              ctx.label_smoothing)
