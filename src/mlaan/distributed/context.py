"""Where this process stands under ``torchrun``: rank, world size, device, and joining or leaving the group."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..runtime import pick_device
from .modes import TORCHRUN_VARS


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


def init_from_env(device_arg: str = "auto", timeout_s: float | None = None) -> DistContext:
    """Build the context from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the group.

    Without those variables this is a single process (``enabled=False``). The backend is NCCL when the device
    is CUDA, gloo otherwise. ``device_arg``: ``"auto"`` (CUDA if available, else MPS for a single process, else
    CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, ``"mps"``. Under torchrun a CUDA device is always
    ``cuda:LOCAL_RANK``, one GPU per process. ``timeout_s``: how long a collective or point-to-point call may
    wait for another rank before failing (None: PyTorch's default), so a lost rank or a protocol error ends the
    run instead of hanging it.
    """
    distributed = all(v in os.environ for v in TORCHRUN_VARS)
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
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=timeout)
    return DistContext(rank, world_size, local_rank, device, True, backend)


def all_gather_objects(obj: object, ctx: DistContext) -> list:
    """Every rank's ``obj`` (picklable: tensors, plain data), rank by rank; ``[obj]`` without other ranks. A
    collective: every rank calls it at the same point."""
    if not ctx.synchronising:
        return [obj]
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def cleanup(ctx: DistContext) -> None:
    """Leave the process group (no-op in a single process)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
