"""BatchNorm across ranks: :class:`SyncBatchNorm` normalises with the statistics of every rank's batch (CPU and
gloo included); without it, :func:`average_batchnorm_buffers` keeps the running statistics equal on every rank."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .buckets import buckets
from .context import DistContext


class _SyncBatchNormCPU(torch.autograd.Function):
    """Batch normalisation over the union of every rank's batch, for devices ``nn.SyncBatchNorm`` refuses.

    Forward: all-gather each rank's (mean, biased variance, count) and combine them (Chan et al.'s parallel
    variance). Backward: all-reduce Σdy and Σdy·(x−μ) so every rank's input gradient is the gradient of the
    union-batch normalisation; weight and bias gradients stay local sums (the gradient averager does the rest).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group, world_size):  # noqa: D401
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        acc = torch.promote_types(x.dtype, torch.float32)  # statistics in fp32 at least (fp64 stays fp64)
        xf = x.to(acc)
        count = xf.numel() // channels
        local = torch.cat([xf.mean(dims), xf.var(dims, unbiased=False), xf.new_full((1,), float(count))])
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=group)
        stats = torch.stack(gathered)  # (world, 2C + 1)
        counts = stats[:, -1:]
        total = counts.sum()
        means, variances = stats[:, :channels], stats[:, channels : 2 * channels]
        mean = (means * counts).sum(0) / total
        var = ((variances + (means - mean) ** 2) * counts).sum(0) / total
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            unbiased = var * (total / (total - 1)) if total > 1 else var
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        xhat = (xf - mean.view(shape)) * invstd.view(shape)
        y = xhat
        if weight is not None:
            y = y * weight.to(acc).view(shape)
        if bias is not None:
            y = y + bias.to(acc).view(shape)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.total, ctx.group, ctx.has_bias = total, group, bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, mean, invstd = ctx.saved_tensors
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        dy = grad_output.to(mean.dtype)
        xmu = x.to(mean.dtype) - mean.view(shape)
        sum_dy = dy.sum(dims)
        sum_dy_xmu = (dy * xmu).sum(dims)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            both = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(both, group=ctx.group)
            mean_dy = both[:channels] / ctx.total
            mean_dy_xmu = both[channels:] / ctx.total
            scale = invstd if weight is None else invstd * weight.to(mean.dtype)
            grad_input = (
                (dy - mean_dy.view(shape) - xmu * (invstd**2 * mean_dy_xmu).view(shape)) * scale.view(shape)
            ).to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(weight.dtype if weight is not None else grad_output.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class SyncBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` that also works on CPU (gloo): CUDA inputs take PyTorch's kernel, CPU inputs a
    plain-tensor implementation with the same statistics, running-buffer updates and gradients."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Module's signature
        if input.device.type != "cpu" or not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        group = self.process_group or dist.group.WORLD
        world_size = dist.get_world_size(group)
        if world_size == 1:
            return super().forward(input)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        tracking = self.track_running_stats
        if tracking:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked.item())
        return _SyncBatchNormCPU.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if tracking else None,
            self.running_var if tracking else None,
            self.eps,
            momentum,
            group,
            world_size,
        )

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def convert_sync_batchnorm(model: nn.Module, process_group: object | None = None) -> int:
    """Replace every BatchNorm in ``model`` by :class:`SyncBatchNorm`, **in place**, in every parent.

    Unlike ``nn.SyncBatchNorm.convert_sync_batchnorm`` this keeps shared submodules shared: a BatchNorm reached
    through several parents (the engine's ``local_modules`` views hold the very block objects of
    ``backbone.blocks``) is replaced by one new module in all of them. The new module reuses the old one's
    Parameter and buffer tensors and settings (``track_running_stats=False`` of the EMA twins included).
    Returns the number of BatchNorm modules converted.
    """
    replacements: dict[int, nn.Module] = {}
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
            replacements[id(module)] = _sync_copy(module, process_group)
    if isinstance(model, nn.modules.batchnorm._BatchNorm) and id(model) in replacements:
        raise ValueError("convert_sync_batchnorm works in place: pass a model that contains BatchNorm layers")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in replacements:
                setattr(parent, name, replacements[id(child)])
    return len(replacements)


def _sync_copy(bn: nn.modules.batchnorm._BatchNorm, process_group: object | None) -> SyncBatchNorm:
    new = SyncBatchNorm(
        bn.num_features,
        bn.eps,
        bn.momentum,
        bn.affine,
        bn.track_running_stats,
        process_group,
        device=bn.weight.device if bn.weight is not None else None,
    )
    # Same Parameter and buffer objects: anything that already refers to them (an optimizer, a twin's
    # averaging) keeps working, and no value is copied.
    new._parameters = dict(bn._parameters)
    new._buffers = dict(bn._buffers)
    new._non_persistent_buffers_set = set(bn._non_persistent_buffers_set)
    new.train(bn.training)
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    return new


@torch.no_grad()
def average_batchnorm_buffers(model: nn.Module | Iterable[nn.Module], ctx: DistContext,
                              group: dist.ProcessGroup | None = None) -> None:
    """Average the running mean/variance of every BatchNorm that is not a SyncBatchNorm across ranks.

    ``model``: a module, or several (a pipeline stage's own parts); ``group``: the ranks to average over (None:
    all of them; a pipeline stage's replicas under ``--data-parallel``)."""
    if not ctx.synchronising:
        return
    size = dist.get_world_size(group)
    if size < 2:
        return
    buffers: list[torch.Tensor] = []
    seen: set[int] = set()
    roots = [model] if isinstance(model, nn.Module) else list(model)
    for module in (m for root in roots for m in root.modules()):
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(module, nn.SyncBatchNorm):
            continue
        if not module.track_running_stats:
            continue
        for buf in (module.running_mean, module.running_var):
            if buf is not None and buf.is_floating_point() and id(buf) not in seen:
                seen.add(id(buf))
                buffers.append(buf)
    for bucket in buckets(buffers, 64 * 2**20):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        for t, value in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(value)
