"""InfoPro (Wang et al., ICLR 2021): λ1 · reconstruction + λ2 · task loss, λ linear in the module index."""

from __future__ import annotations

from torch import nn

from ..heads import InfoProLoss
from .base import AuxContext, LocalMethod
from .registry import register


@register
class InfoPro(LocalMethod):
    name = "infopro"
    listing_order = 20
    description = "information propagation: image reconstruction + cross-entropy or supervised contrastive"

    def make_head(self, ctx: AuxContext) -> nn.Module:
        opts = ctx.options
        return InfoProLoss(
            channels=ctx.feature_shape[0],
            image_shape=ctx.image_shape,
            num_classes=ctx.num_classes,
            lambda_recon=ctx.interpolate(opts.infopro_lambda_recon),
            lambda_task=ctx.interpolate(opts.infopro_lambda_task),
            task=opts.infopro_task,
            head_shape=opts.aux_head,
            width=opts.aux_width,
            temperature=opts.temperature,
            image_mean=opts.image_mean,
            image_std=opts.image_std,
        )
