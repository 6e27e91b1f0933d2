"""What a training run says and records as it goes: the banner at its start, the line and the ``metrics.jsonl``
record of each epoch, the ``metrics.json`` summary and the lines that end the run, and its warnings. Each function
reads a run (:class:`TrainingRun`: what a :class:`~mlaan.training.trainer.Trainer` shows) and changes nothing;
the trainer decides when to show them (rank 0 only, through its ``log``)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .. import runtime
from . import metrics_log
from .checkpoint import Progress
from .run_folder import RUN_FILES

if TYPE_CHECKING:
    from ..data import DatasetInfo
    from ..distributed import DistContext
    from ..distributed.pipeline import ModulePipeline
    from ..engine import LocalModel
    from .config import TrainConfig
    from .parallel import RunLayout


class TrainingRun(Protocol):
    """What the console reads of a run (the :class:`~mlaan.training.trainer.Trainer`, which calls it, so this file
    does not import it)."""

    cfg: TrainConfig
    info: DatasetInfo
    ctx: DistContext
    device: torch.device
    layout: RunLayout
    fast_path: runtime.FastPath
    local_model: LocalModel
    pipeline: ModulePipeline | None
    optimizer: torch.optim.Optimizer
    progress: Progress
    out: Path
    resume_path: str | os.PathLike | None
    resizes: bool
    steps_per_epoch: int
    warmup_steps: int
    total_steps: int
    workers: int
    log: Callable[[str], None]


def position(progress: Progress, steps_per_epoch: int) -> str:
    """Where the run stands, e.g. "step 250 (epoch 1, 250/469 steps)" (the epoch in progress, from 1), or
    "step 938 (end of epoch 2)" between epochs (a finished run's next epoch does not exist)."""
    if progress.epoch_step == 0 and progress.epoch > 0:
        return f"step {progress.step} (end of epoch {progress.epoch})"
    return f"step {progress.step} (epoch {progress.epoch + 1}, {progress.epoch_step}/{steps_per_epoch} steps)"


def banner(run: TrainingRun) -> str:
    """The line that starts a run: what trains on what, the schedule, the device and its fast path, the output
    folder and, for a resumed run, where it goes on from."""
    cfg, info = run.cfg, run.info
    resumed = (f" | resumed from {run.resume_path} at {position(run.progress, run.steps_per_epoch)}"
               if run.resume_path is not None else "")
    return (
        f"mlaan train: {cfg.arch} {cfg.method} K={cfg.local_modules} on {info.name} "
        f"({info.train_size} train / {info.test_size} test images, from {info.source}"
        f"{f', resized to {cfg.image_size}x{cfg.image_size}' if run.resizes else ''}) | "
        f"{runtime.plural(cfg.epochs, 'epoch')} x {runtime.plural(run.steps_per_epoch, 'step')}, "
        f"batch {cfg.batch_size}, lr {cfg.lr}"
        f"{f', precise BN on {cfg.precise_bn} batches' if cfg.precise_bn else ''} | "
        f"device {run.device}{' x' + str(run.ctx.world_size) if run.ctx.world_size > 1 else ''}"
        f"{_parallel_text(run)} "
        f"({run.fast_path.describe()}{', data on device' if cfg.data_on_device else ''}) | "
        f"output {run.out}{resumed}"
    )


def _parallel_text(run: TrainingRun) -> str:
    if run.pipeline is None:
        return ""
    runs = ", ".join(f"{r.start}-{r.stop - 1}" for r in run.pipeline.ranges)
    if run.layout.replicas > 1:  # --data-parallel R: R copies of the pipeline, each stage's gradients averaged
        return (f", {run.layout.replicas} pipeline replicas x {len(run.pipeline.ranges)} stages, modules per "
                f"stage {runs} ({run.cfg.boundary} boundaries)")
    return f", modules per rank {runs} ({run.cfg.boundary} boundaries)"


def rescale_text(run: TrainingRun, saved_shape: str, shape: str) -> str:
    """The line a ``--rescale-schedule`` resume starts with: the run's shape before (``saved_shape``) and now
    (``shape``, both :func:`~mlaan.training.resume.describe_shape`), and its schedule from here."""
    return (f"mlaan train: --rescale-schedule: the run trained with {saved_shape} goes on with {shape} from "
            f"{position(run.progress, run.steps_per_epoch)}, lr {run.optimizer.param_groups[0]['lr']:.4g} "
            f"({run.warmup_steps} warm-up steps, lr 0 after step {run.total_steps} of the schedule)")


def warn_of_warmup(cfg: TrainConfig, warmup_steps: int, total_steps: int) -> None:
    """Warn (on stderr) when the warm-up leaves no step to the cosine decay: ``--epochs 1`` with the default
    ``--warmup-epochs 1``, or a paper config's 10 with ``--epochs 2``. Decided on the schedule's steps, which
    span ``--epochs`` whatever ``--max-steps`` says."""
    if warmup_steps < total_steps:
        return
    # said in steps too: the schedule counts whole steps, so 1.9 warm-up epochs of 4 steps are all 8 of 2 epochs
    steps = f"({warmup_steps} of {total_steps} steps)"
    if warmup_steps > total_steps:
        what = f"is longer than epochs={cfg.epochs} {steps}: the learning rate never reaches --lr {cfg.lr:g}"
    else:
        what = (f"is as long as epochs={cfg.epochs} {steps}: the learning rate reaches --lr {cfg.lr:g} at the "
                "last step and the cosine decay never runs")
    print(f"mlaan: warning: warmup_epochs={cfg.warmup_epochs:g} {what} (lower --warmup-epochs)", file=sys.stderr)


def why_nothing_to_train(progress: Progress, epochs: int, max_steps: int | None) -> str:
    """Why a resumed run has no step left: at the end of its last epoch, or at (or past) ``--max-steps``."""
    step = progress.step
    # finished as bench accuracy and mlaan report say; its step count may be another schedule's (other ranks)
    if metrics_log.schedule_finished(progress.epoch, epochs):
        return f"already at the end of epoch {epochs}, the run's last (step {step})"
    return f"already at step {step}, {'past' if step > max_steps else 'at'} --max-steps {max_steps}"


def _peak_memory(run: TrainingRun) -> tuple[int, str]:
    """(bytes, kind) of the run's peak memory so far: this process's, or an earlier invocation's when larger
    (:meth:`~mlaan.training.checkpoint.Progress.run_peak_memory`)."""
    return run.progress.run_peak_memory(runtime.peak_memory(run.device))


def epoch_record(run: TrainingRun, epoch: int, train: dict, test: dict, complete: bool) -> dict[str, Any]:
    """The ``metrics.jsonl`` line of ``epoch`` (from 0): its training (``train``, the epoch meter's summary) and
    evaluation (``test``); ``complete``: False when ``--max-steps`` stopped it."""
    mem, kind = _peak_memory(run)
    return {
        "epoch": epoch + 1,
        "step": run.progress.step,
        "complete": complete,
        "train_loss": train["loss"],
        "train_accuracy": train["accuracy"],
        # per local module, this epoch's mean training loss of its independent and cascaded aux nets
        "train_independent_losses": train["module_losses"].get("independent_losses"),
        "train_cascaded_losses": train["module_losses"].get("cascaded_losses"),
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "test_error": 1.0 - test["accuracy"],
        "lr": run.optimizer.param_groups[0]["lr"],
        "images_per_second": train["images_per_second"],
        "epoch_seconds": train["seconds"],
        "peak_memory_bytes": mem,
        "peak_memory_kind": kind,
    }


def epoch_text(record: dict[str, Any], epochs: int, best_accuracy: float) -> str:
    """The line an epoch ends with (its :func:`epoch_record`)."""
    partial = "" if record["complete"] else f" (stopped at step {record['step']}, --max-steps)"
    return (
        f"epoch {record['epoch']}/{epochs}{partial}: "
        f"train loss {record['train_loss']:.4f} acc {100 * record['train_accuracy']:.2f}% | "
        f"test loss {record['test_loss']:.4f} acc {100 * record['test_accuracy']:.2f}% | "
        f"best {100 * best_accuracy:.2f}% | lr {record['lr']:.4g} | "
        f"{record['images_per_second']:.0f} img/s | {record['epoch_seconds']:.1f}s"
    )


def run_summary(run: TrainingRun, test: dict[str, float], start: float) -> dict[str, Any]:
    """What ``metrics.json`` holds at the end of a run: its last evaluation (``test``), best, peak memory, times
    (this invocation's since ``start``, a ``time.perf_counter()``, and the run's in all), shape, model, data,
    config and the files written."""
    mem, kind = _peak_memory(run)
    backbone_params = sum(p.numel() for p in run.local_model.backbone.parameters())
    all_params = sum(p.numel() for p in run.local_model.parameters())
    wall = time.perf_counter() - start
    progress = run.progress
    return {
        "test_accuracy": test["accuracy"],
        "test_error": 1.0 - test["accuracy"],
        "test_loss": test["loss"],
        "best_accuracy": progress.best_accuracy,
        "best_epoch": progress.best_epoch,
        "best_step": progress.best_step,  # a --max-steps stop inside an epoch evaluates too: which one it was
        "peak_memory_bytes": mem,
        "peak_memory_kind": kind,
        "wall_time_seconds": wall,
        "total_wall_time_seconds": progress.wall_time + wall,
        "steps": progress.step,
        "epochs_completed": progress.epoch,
        "steps_per_epoch": run.steps_per_epoch,
        "world_size": run.ctx.world_size,
        "device": str(run.device),
        "parameters": {"backbone": backbone_params, "training_total": all_params},
        "split": [list(r) for r in run.local_model.split],
        "module_parallel": run.pipeline.description() if run.pipeline is not None else None,
        "dataset": run.info.to_dict(),
        "resumed_from": str(run.resume_path) if run.resume_path is not None else None,
        "torch_version": torch.__version__,
        "fast_path": run.fast_path.to_dict(),
        "config": run.cfg.to_dict() | {"workers": run.workers},
        # what the folder holds (metrics.json is written next): a run resumed past its end into a new folder
        # has no metrics.jsonl or best.pt unless its own folder had them
        "outputs": {name: str(run.out / name) for name in RUN_FILES
                    if name == "metrics.json" or (run.out / name).exists()},
    }


def print_summary(run: TrainingRun, s: dict[str, Any]) -> None:
    """The lines that end a run (through ``run.log``): accuracy, steps and time; peak memory; the files written."""
    cuda = s["peak_memory_kind"] == "cuda_max_memory_allocated"
    what = "CUDA peak allocated" if cuda else "peak RSS of the process"
    # a resumed run's total time covers its earlier invocations, and so does its peak if measured the same way
    in_all = f" ({s['total_wall_time_seconds']:.0f}s in all)" if run.resume_path is not None else ""
    earlier = run.progress.peak_memory_kind == s["peak_memory_kind"]
    over = ", the largest of the run's invocations" if earlier else ""
    run.log(
        f"done: test accuracy {100 * s['test_accuracy']:.2f}% (error {100 * s['test_error']:.2f}%), "
        f"best {100 * s['best_accuracy']:.2f}% at epoch {s['best_epoch']}, {runtime.plural(s['steps'], 'step')}, "
        f"{s['wall_time_seconds']:.0f}s{in_all}"
    )
    run.log(f"peak memory: {runtime.format_bytes(s['peak_memory_bytes'])} ({what}{over})")
    present = [n for n in RUN_FILES if (run.out / n).exists()]
    run.log(f"outputs: {run.out}/ ({', '.join(present)})")
