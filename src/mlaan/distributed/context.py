"""Where this process stands under ``torchrun``: rank, world size, device, and joining or leaving the group."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE")


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
    device = _pick_device(device_arg, local_rank, distributed)
    if not distributed:
        return DistContext(device=device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, device, True, backend)


def _pick_device(device_arg: str, local_rank: int, distributed: bool) -> torch.device:
    arg = (device_arg or "auto").strip().lower()
    if arg == "auto":
        if torch.cuda.is_available():
            arg = "cuda"
        elif not distributed and torch.backends.mps.is_available():
            arg = "mps"
        else:
            arg = "cpu"
    try:
        device = torch.device(arg)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device_arg!r}; use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device_arg!r} was asked for but CUDA is not available; use --device cpu")
        count = torch.cuda.device_count()
        if distributed:
            if device.index is not None and device.index != local_rank:
                warnings.warn(
                    f"under torchrun each process uses cuda:LOCAL_RANK; ignoring {device_arg!r} for cuda:{local_rank}",
                    stacklevel=3,
                )
            if local_rank >= count:
                raise ValueError(
                    f"LOCAL_RANK={local_rank} but this machine has {count} CUDA device(s): start at most "
                    f"{count} processes per node (--nproc-per-node)"
                )
            return torch.device("cuda", local_rank)
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= count:
            raise ValueError(f"device {device_arg!r} does not exist: this machine has {count} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type == "mps":
        if distributed:
            raise ValueError("MPS cannot be used with torchrun (no MPS process-group backend); use --device cpu")
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device_arg!r} was asked for but MPS is not available")
        return device
    if device.type != "cpu":
        raise ValueError(f"unsupported device {device_arg!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def cleanup(ctx: DistContext) -> None:
    """Leave the process group (no-op in a single process)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
