"""Local learning on several processes with ``torch.distributed``, started by ``torchrun``: data parallelism (this
page) and module parallelism (:mod:`.pipeline`: each rank trains a run of local modules, docs/PARALLELISM.md).

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

One concern a module: :mod:`.context` (rank, world size, device; joining and leaving the process group),
:mod:`.replicate` (the model on every rank), :mod:`.gradients` (:class:`GradientAverager`), :mod:`.batchnorm`
(SyncBatchNorm, averaged running statistics), :mod:`.sampling` (which samples each rank reads),
:mod:`.metrics` (per-rank metrics combined), :mod:`.buckets` (tensors grouped for collectives),
:mod:`.pipeline` (module parallelism) and :mod:`.mesh` (pipeline replicas: the R × P rank layout and its groups).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports
from .modes import BOUNDARY_MODES, PARALLEL_MODES, PARTITION_MODES

if TYPE_CHECKING:
    from .batchnorm import SyncBatchNorm, average_batchnorm_buffers, convert_sync_batchnorm
    from .context import DistContext, all_gather_objects, cleanup, init_from_env
    from .gradients import GradientAverager
    from .metrics import is_count_key, reduce_metrics
    from .pipeline import ModulePipeline
    from .replicate import prepare_model
    from .sampling import ShardSampler, make_eval_sampler, make_train_sampler

# imported on first use: the choices above are read by ``mlaan --help``, which must not pull in torch
_WHERE = {
    "SyncBatchNorm": "batchnorm", "average_batchnorm_buffers": "batchnorm", "convert_sync_batchnorm": "batchnorm",
    "DistContext": "context", "all_gather_objects": "context", "cleanup": "context", "init_from_env": "context",
    "GradientAverager": "gradients",
    "is_count_key": "metrics", "reduce_metrics": "metrics",
    "ModulePipeline": "pipeline",
    "prepare_model": "replicate",
    "ShardSampler": "sampling", "make_eval_sampler": "sampling", "make_train_sampler": "sampling",
}

__all__ = [
    "BOUNDARY_MODES",
    "PARALLEL_MODES",
    "PARTITION_MODES",
    "DistContext",
    "GradientAverager",
    "ModulePipeline",
    "ShardSampler",
    "SyncBatchNorm",
    "all_gather_objects",
    "average_batchnorm_buffers",
    "cleanup",
    "convert_sync_batchnorm",
    "init_from_env",
    "is_count_key",
    "make_eval_sampler",
    "make_train_sampler",
    "prepare_model",
    "reduce_metrics",
]


__getattr__ = lazy_exports(__name__, _WHERE)
