"""Gradient averaging across ranks, module by module: each local module's all-reduce starts as soon as the engine
reports its gradients final, overlapping the compute of the next module."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .batchnorm import average_batchnorm_buffers
from .buckets import buckets
from .context import DistContext


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

    ``group``: the ranks to average over (None: all). Pipeline replicas (``--parallel modules --data-parallel
    R``) give a stage's data-parallel group (:func:`mlaan.distributed.mesh.build_groups`) and, as
    ``buffer_modules``, the stage's own parts (blocks, aux nets, EMA twins), whose BatchNorm statistics are then
    the only ones averaged: the rest of the model is other stages' and not trained here. Only the stage's modules
    get gradients, so the gradients reduced are its own without more ado.
    """

    def __init__(
        self, model: nn.Module, ctx: DistContext, bucket_cap_mb: float = 25.0, sync_buffers: bool = True,
        group: dist.ProcessGroup | None = None, buffer_modules: list[nn.Module] | None = None,
    ) -> None:
        self.model, self.ctx, self.group = model, ctx, group
        self.buffer_modules = buffer_modules
        self.size = dist.get_world_size(group) if ctx.synchronising else 1
        self.enabled = ctx.synchronising and self.size > 1
        self.cap_bytes = max(1, int(bucket_cap_mb * 2**20))
        self.sync_buffers = sync_buffers
        self._flights: list[_Flight] = []
        self._reduced: set[int] = set()
        self.stragglers = 0  # parameters reduced in wait() because no hook reported them (diagnostics)
        self.overlapped_buckets = 0  # buckets of the last step launched from a hook, i.e. during train_step
        if self.enabled:
            if not hasattr(model, "register_grads_ready_hook"):
                raise TypeError("GradientAverager needs a model with register_grads_ready_hook (a LocalModel)")
            model.register_grads_ready_hook(self._on_grads_ready)

    def _on_grads_ready(self, params: list[nn.Parameter]) -> None:
        grads = []
        for p in params:
            if p.grad is None or id(p) in self._reduced:
                continue
            self._reduced.add(id(p))
            grads.append(p.grad)
        self._launch(grads)

    def _launch(self, grads: list[torch.Tensor]) -> None:
        for bucket in buckets(grads, self.cap_bytes):
            flat = _flatten_dense_tensors(bucket)
            work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
            self._flights.append(_Flight(work, flat, bucket))

    @torch.no_grad()
    def wait(self) -> None:
        """Finish every all-reduce of the step and write the averaged gradients back into ``.grad``."""
        if not self.enabled:
            return
        left = [
            p.grad
            for p in self.model.parameters()  # each shared Parameter once
            if p.requires_grad and p.grad is not None and id(p) not in self._reduced
        ]
        self.stragglers = len(left)
        self.overlapped_buckets = len(self._flights)
        self._launch(left)
        world = float(self.size)
        for flight in self._flights:
            flight.work.wait()
            flight.flat.div_(world)
            for grad, value in zip(flight.grads, _unflatten_dense_tensors(flight.flat, flight.grads)):
                grad.copy_(value)
        self._flights.clear()
        self._reduced.clear()
        if self.sync_buffers:
            average_batchnorm_buffers(self.buffer_modules or self.model, self.ctx, self.group)

