"""BP: plain end-to-end backpropagation, K = 1 — the baseline every table compares against."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import AuxContext, LocalMethod
from .registry import register

if TYPE_CHECKING:
    from torch import nn


@register
class BP(LocalMethod):
    name = "bp"
    listing_order = 0
    description = "end-to-end backpropagation (K=1)"
    end_to_end = True

    def make_head(self, ctx: AuxContext) -> nn.Module:
        raise RuntimeError("bp trains one module end to end and has no auxiliary heads")
