"""Data-parallel local learning on ``torch.distributed``: one process per device, started by ``torchrun``.

What a trainer does::

    ctx = init_from_env(args.device)                 # reads RANK/WORLD_SIZE/LOCAL_RANK; single process without
    model = prepare_model(model, ctx, sync_bn=True)  # device, (Sync)BatchNorm, rank 0's weights everywhere
    averager = GradientAverager(model, ctx)          # hooks the engine's grads-ready events
    sampler = make_train_sampler(train_set, ctx, seed)   # DistributedSampler (call .set_epoch each epoch)
    for images, targets in loader:
        model.zero_grad(set_to_none=True)
        stats = model.train_step(images, targets)    # each module's all-reduce starts when its backward ends
        averager.wait()                              # averaged gradients (and BatchNorm buffers) are in place
        optimizer.step(); model.after_optimizer_step()   # EMA twins: same params in => same twins out
    stats = reduce_metrics(stats, ctx)
    cleanup(ctx)

Gradients are averaged module by module: the engine calls a hook as soon as a local module (or an aux net) has
its final gradient for the step, and :class:`GradientAverager` launches an asynchronous all-reduce on those
gradients right there, so the communication of module j overlaps the forward/backward of module j+1.

BatchNorm across ranks: with ``sync_bn`` every BatchNorm (aux nets and EMA twins included) normalises with the
statistics of the union of all ranks' batches, so N processes with batch B each compute exactly what one process
with batch N·B computes. PyTorch's ``nn.SyncBatchNorm`` only runs on accelerators; :class:`SyncBatchNorm` here is
a subclass that uses it on CUDA and its own gloo-friendly implementation on CPU. Without ``sync_bn`` each rank
normalises with its own batch (DDP's default) and :meth:`GradientAverager.wait` averages the running statistics
across ranks so that every rank, and every EMA twin that follows them, stays identical.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.utils.data import DistributedSampler, Sampler

from .runtime import pick_device

__all__ = [
    "DistContext",
    "GradientAverager",
    "ShardSampler",
    "SyncBatchNorm",
    "cleanup",
    "convert_sync_batchnorm",
    "init_from_env",
    "make_eval_sampler",
    "make_train_sampler",
    "prepare_model",
    "reduce_metrics",
]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE")


# ------------------------------------------------------------------------------------------------ context
@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes and the device it computes on.

    ``enabled`` is True when the process was started by torchrun (a process group exists), even with one
    process; False for a plain ``python -m mlaan`` run (rank 0 of a world of 1).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, writes checkpoints and prints."""
        return self.rank == 0

    @property
    def synchronising(self) -> bool:
        """True when there is someone to talk to (enabled and more than one process)."""
        return self.enabled and self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if not self.enabled:
            return
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()


def init_from_env(device_arg: str = "auto") -> DistContext:
    """Build the context from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the group.

    Without those variables this is a single process (``enabled=False``). The backend is NCCL when the device
    is CUDA, gloo otherwise. ``device_arg``: ``"auto"`` (CUDA if available, else MPS for a single process, else
    CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, ``"mps"``. Under torchrun a CUDA device is always
    ``cuda:LOCAL_RANK``, one GPU per process.
    """
    distributed = all(v in os.environ for v in _TORCHRUN_VARS)
    rank = int(os.environ.get("RANK", 0)) if distributed else 0
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if distributed else 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if distributed else 0
    device = pick_device(device_arg, local_rank, distributed)
    if not distributed:
        return DistContext(device=device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, device, True, backend)


def cleanup(ctx: DistContext) -> None:
    """Leave the process group (no-op in a single process)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- SyncBatchNorm
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


# --------------------------------------------------------------------------------------------- the model
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
    for bucket in _buckets(tensors, 64 * 2**20):
        flat = _flatten_dense_tensors(bucket)
        dist.broadcast(flat, src=0)
        for t, value in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(value)


def _buckets(tensors: Iterable[torch.Tensor], cap_bytes: int) -> Iterator[list[torch.Tensor]]:
    """Group tensors by (device, dtype), then into runs of at most ``cap_bytes`` (order preserved)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in group:
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > cap_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append(t)
            size += nbytes
        if bucket:
            yield bucket


# ---------------------------------------------------------------------------------------- gradients
@dataclass
class _Flight:
    work: object
    flat: torch.Tensor
    grads: list[torch.Tensor]


class GradientAverager:
    """Average every local module's gradients across ranks, each module as soon as its backward is done.

    It registers a grads-ready hook on the model; every time the engine reports parameters whose gradient is
    final for the step (a local module after its last backward, cascades included, or an aux net after its
    loss), their gradients are flattened into buckets of at most ``bucket_cap_mb`` and an asynchronous
    all-reduce is launched, so it overlaps the compute of the next module. :meth:`wait` (after ``train_step``,
    before ``optimizer.step()``) waits for them, divides by the world size and writes the averages back.
    Trainable parameters with a gradient that no hook reported are reduced there too (none with the engine).

    ``sync_buffers``: BatchNorm running statistics of layers that are not synchronised (``sync_bn`` off) are
    averaged across ranks in :meth:`wait`, so every rank — and every EMA twin, which follows parameters *and*
    buffers — stays identical. Everything is a no-op in a single process.
    """

    def __init__(
        self, model: nn.Module, ctx: DistContext, bucket_cap_mb: float = 25.0, sync_buffers: bool = True
    ) -> None:
        self.model, self.ctx = model, ctx
        self.enabled = ctx.synchronising
        self.cap_bytes = max(1, int(bucket_cap_mb * 2**20))
        self.sync_buffers = sync_buffers
        self._flights: list[_Flight] = []
        self._reduced: set[int] = set()
        self._accumulating = False
        self.stragglers = 0  # parameters reduced in wait() because no hook reported them (diagnostics)
        self.overlapped_buckets = 0  # buckets of the last step launched from a hook, i.e. during train_step
        if self.enabled:
            if not hasattr(model, "register_grads_ready_hook"):
                raise TypeError("GradientAverager needs a model with register_grads_ready_hook (a LocalModel)")
            model.register_grads_ready_hook(self._on_grads_ready)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradient accumulation: ``train_step`` calls inside this block accumulate locally without
        communication; the next ``train_step`` outside it reduces the accumulated gradients."""
        previous, self._accumulating = self._accumulating, True
        try:
            yield
        finally:
            self._accumulating = previous

    def _on_grads_ready(self, params: list[nn.Parameter]) -> None:
        if self._accumulating:
            return
        grads = []
        for p in params:
            if p.grad is None or id(p) in self._reduced:
                continue
            self._reduced.add(id(p))
            grads.append(p.grad)
        self._launch(grads)

    def _launch(self, grads: list[torch.Tensor]) -> None:
        for bucket in _buckets(grads, self.cap_bytes):
            flat = _flatten_dense_tensors(bucket)
            work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)
            self._flights.append(_Flight(work, flat, bucket))

    @torch.no_grad()
    def wait(self) -> None:
        """Finish every all-reduce of the step and write the averaged gradients back into ``.grad``."""
        if not self.enabled or self._accumulating:
            return
        left = [
            p.grad
            for p in _unique_parameters(self.model)
            if p.requires_grad and p.grad is not None and id(p) not in self._reduced
        ]
        self.stragglers = len(left)
        self.overlapped_buckets = len(self._flights)
        self._launch(left)
        world = float(self.ctx.world_size)
        for flight in self._flights:
            flight.work.wait()
            flight.flat.div_(world)
            for grad, value in zip(flight.grads, _unflatten_dense_tensors(flight.flat, flight.grads)):
                grad.copy_(value)
        self._flights.clear()
        self._reduced.clear()
        if self.sync_buffers:
            average_batchnorm_buffers(self.model, self.ctx)


def _unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())  # nn.Module.parameters() already yields each shared Parameter once


@torch.no_grad()
def average_batchnorm_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Average the running mean/variance of every BatchNorm that is not a SyncBatchNorm across ranks."""
    if not ctx.synchronising:
        return
    buffers: list[torch.Tensor] = []
    seen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(module, nn.SyncBatchNorm):
            continue
        if not module.track_running_stats:
            continue
        for buf in (module.running_mean, module.running_var):
            if buf is not None and buf.is_floating_point() and id(buf) not in seen:
                seen.add(id(buf))
                buffers.append(buf)
    for bucket in _buckets(buffers, 64 * 2**20):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat)
        flat.div_(ctx.world_size)
        for t, value in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(value)


# ------------------------------------------------------------------------------------------- metrics
_SUM_NAMES = {"n", "count", "samples", "correct", "total", "seen", "images"}
_SUM_SUFFIXES = ("_count", "_correct", "_total", "_sum", "_samples", "_seen", "_images")


def is_count_key(key: str) -> bool:
    """Keys :func:`reduce_metrics` sums instead of averaging: ``n``, ``count``, ``samples``, ``correct``,
    ``total``, ``seen``, ``images``, ``num_*`` and ``*_count``/``_correct``/``_total``/``_sum``/``_samples``/
    ``_seen``/``_images``."""
    return key in _SUM_NAMES or key.startswith("num_") or key.endswith(_SUM_SUFFIXES)


def reduce_metrics(metrics: dict, ctx: DistContext, sum_keys: Iterable[str] = ()) -> dict:
    """Combine per-rank metrics: the **mean** over ranks, except counts (see :func:`is_count_key`, plus
    ``sum_keys``), which are **summed**. Numbers and lists/tuples of numbers (e.g. ``module_losses``,
    element-wise) are reduced; anything else is passed through from this rank. Every rank must call it with
    the same keys. Returns a new dict; a single process gets a copy of its own metrics.

    Means are unweighted, right when every rank has the same batch size (DistributedSampler). For exact
    accuracies over an uneven split, reduce counts (``correct``, ``total``) and divide afterwards.
    """
    out = dict(metrics)
    if not ctx.synchronising:
        return out
    summed = set(sum_keys)
    keys = sorted(k for k, v in metrics.items() if _numeric(v))
    values: list[float] = []
    for k in keys:
        v = metrics[k]
        values.extend(float(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
    if not keys:
        return out
    lengths = torch.tensor([len(values)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(lengths, op=dist.ReduceOp.MAX)
    if int(lengths.item()) != len(values):
        raise ValueError("reduce_metrics: ranks passed metrics of different shapes; every rank needs the same keys")
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    reduced = tensor.cpu().tolist()
    i = 0
    for k in keys:
        v = metrics[k]
        n = len(v) if isinstance(v, (list, tuple)) else 1
        part = reduced[i : i + n]
        i += n
        if not (k in summed or is_count_key(k)):
            part = [x / ctx.world_size for x in part]
        if isinstance(v, (list, tuple)):
            out[k] = type(v)(part)
        elif isinstance(v, int) and not isinstance(v, bool) and (k in summed or is_count_key(k)):
            out[k] = int(round(part[0]))
        else:
            out[k] = part[0]
    return out


def _numeric(v: object) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    if isinstance(v, torch.Tensor):
        return False
    return isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


# ------------------------------------------------------------------------------------------- samplers
def make_train_sampler(dataset: Sized, ctx: DistContext, seed: int = 0) -> Sampler | None:
    """A shuffling ``DistributedSampler`` under torchrun (each rank a disjoint 1/N of every epoch, padded to
    equal length), None in a single process (let the DataLoader shuffle). Call ``sampler.set_epoch(epoch)``
    at the start of each epoch, or every epoch has the same order."""
    if not ctx.enabled:
        return None
    return DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=False
    )


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + N, rank + 2N, …``: disjoint shards covering the data set once, no padding, so
    summed ``correct``/``total`` counts give the exact accuracy over the whole evaluation set."""

    def __init__(self, dataset: Sized, rank: int, world_size: int) -> None:
        self.length, self.rank, self.world_size = len(dataset), rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def make_eval_sampler(dataset: Sized, ctx: DistContext) -> Sampler | None:
    """A :class:`ShardSampler` under torchrun (evaluate 1/N per rank, then ``reduce_metrics`` the counts),
    None in a single process."""
    if not ctx.enabled:
        return None
    return ShardSampler(dataset, ctx.rank, ctx.world_size)
