"""The model of a data-parallel run: on this rank's device, BatchNorm synchronised if asked, and rank 0's
parameters and buffers on every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .batchnorm import convert_sync_batchnorm
from .buckets import buckets
from .context import DistContext


def prepare_model(model: nn.Module, ctx: DistContext, sync_bn: bool = False) -> nn.Module:
    """Move ``model`` to ``ctx.device``; under torchrun convert BatchNorm to :class:`SyncBatchNorm` when
    ``sync_bn`` and give every rank rank 0's parameters and buffers. Returns the same model object."""
    model.to(ctx.device)
    if not ctx.enabled:
        return model
    if sync_bn and ctx.world_size > 1:
        convert_sync_batchnorm(model)
    if ctx.world_size > 1:
        _broadcast_state(model, ctx)
    return model


@torch.no_grad()
def _broadcast_state(model: nn.Module, ctx: DistContext) -> None:
    tensors = [p.data for p in model.parameters()] + list(model.buffers())
    for bucket in buckets(tensors, 64 * 2**20):
        flat = _flatten_dense_tensors(bucket)
        dist.broadcast(flat, src=0)
        for t, value in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(value)

