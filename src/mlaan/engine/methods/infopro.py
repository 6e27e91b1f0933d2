"""InfoPro (Wang et al., ICLR 2021): λ1 · reconstruction + λ2 · task loss, λ linear in the module index.

Its options (``infopro_task``, ``infopro_lambda_recon``, ``infopro_lambda_task``, ``temperature``) are declared
here. Its loss (:class:`InfoProLoss`, with :func:`supervised_contrastive_loss` for the contrastive task) is torch
code kept in :mod:`._infopro_loss` so that declaring the method imports no torch (``mlaan --help`` reads the
declaration); both names are importable from this module too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..engine_options import check_choices
from .base import AuxContext, LocalMethod
from .registry import register

if TYPE_CHECKING:
    from torch import nn

    from ._infopro_loss import InfoProLoss, supervised_contrastive_loss  # noqa: F401

INFOPRO_TASKS = ("ce", "contrastive")


@dataclass
class InfoProOptions:
    """InfoPro's options; the λ defaults are the paper's CIFAR values (docs/METHOD.md#auxiliary-heads)."""

    infopro_task: str = field(default="ce", metadata={
        "help": "InfoPro's task loss: 'ce' (aux classifier) or 'contrastive' (supervised contrastive)",
        "choices": INFOPRO_TASKS})
    infopro_lambda_recon: tuple[float, float] = field(default=(5.0, 0.0), metadata={
        "help": "InfoPro λ1 (reconstruction weight) at the first module's aux net and at the last one's",
        "metavar": ("FIRST", "LAST")})
    infopro_lambda_task: tuple[float, float] = field(default=(0.5, 0.0), metadata={
        "help": "InfoPro λ2 (task-loss weight) at the first module's aux net and at the last one's",
        "metavar": ("FIRST", "LAST")})
    temperature: float = field(default=0.07, metadata={
        "help": "temperature of InfoPro's supervised contrastive loss, > 0",
        "read_when": {"infopro_task": ("contrastive",)}})

    def __post_init__(self) -> None:
        check_choices(self)  # infopro_task, in any case
        if not self.temperature > 0:  # a zero temperature divides by zero in the first step
            raise ValueError(f"need temperature > 0, got {self.temperature}")
        for name in ("infopro_lambda_recon", "infopro_lambda_task"):
            value = getattr(self, name)
            if len(value) != 2:
                raise ValueError(f"{name} takes two values (first module, last module), got {value}")
            # A negative weight turns a loss into one to maximise: the module would learn to destroy information.
            if not all(v >= 0.0 for v in value):  # (finite: checked for every option, mlaan.engine.options)
                raise ValueError(f"{name} must be non-negative weights, got {value}")


@register
class InfoPro(LocalMethod):
    name = "infopro"
    listing_order = 20
    description = "information propagation: image reconstruction + cross-entropy or supervised contrastive"
    Options = InfoProOptions
    head_options = ("aux_head", "aux_width", "image_mean", "image_std")

    def make_head(self, ctx: AuxContext) -> nn.Module:
        from ._infopro_loss import InfoProLoss

        opts = ctx.options
        lambda_recon = ctx.interpolate(opts.infopro_lambda_recon)
        lambda_task = ctx.interpolate(opts.infopro_lambda_task)
        if lambda_recon == lambda_task == 0:  # the published end values (0, 0) reach the last aux net
            warnings.warn(f"infopro: the aux net of local module {ctx.module_index} has λ1 = λ2 = 0 (the LAST values "
                          "of --infopro-lambda-recon/--infopro-lambda-task, as published): its own loss is zero, as "
                          "in InfoPro's official code, so the module learns only from a cascade (infopro+mlaan); "
                          "give a LAST value above 0 to train it by its own loss", UserWarning, stacklevel=1)
        return InfoProLoss(
            channels=ctx.feature_kind.channels,
            image_shape=ctx.image_shape,
            num_classes=ctx.num_classes,
            lambda_recon=lambda_recon,
            lambda_task=lambda_task,
            task=opts.infopro_task,
            head_shape=opts.aux_head,
            width=opts.aux_width,
            temperature=opts.temperature,
            image_mean=opts.image_mean,
            image_std=opts.image_std,
            kind=ctx.feature_kind,
            label_smoothing=ctx.label_smoothing,
        )


def __getattr__(name: str) -> Any:
    """``InfoProLoss`` and ``supervised_contrastive_loss``, imported (with torch) when first asked for."""
    if name in ("InfoProLoss", "supervised_contrastive_loss"):
        from . import _infopro_loss

        return getattr(_infopro_loss, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
