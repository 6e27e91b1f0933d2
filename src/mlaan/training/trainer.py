"""The training loop of ``mlaan train``.

``Trainer(config, checkpoint)`` does everything that can fail on bad input — names, data, model, K, the
checkpoint to resume, the output folder — without writing anything; ``fit()`` then trains and writes
``metrics.jsonl`` (a line per epoch), ``last.pt``/``best.pt`` (each epoch) and ``metrics.json`` (at the end).

The recipe (SGD, warm-up + cosine), the step (``optimizer_step``: ``zero_grad`` → ``train_step`` → gradient
all-reduce → ``optimizer.step`` → ``after_optimizer_step``) and evaluation live in :mod:`mlaan.training.loop`;
this class adds the run around them: data, resume, checkpoints, signals, logs. The scheduler steps after each
optimizer step.

Distributed runs go through :mod:`mlaan.distributed` (``init_from_env``, ``prepare_model``,
``GradientAverager``, ``reduce_metrics``, ``make_train_sampler``); only rank 0 logs and writes.
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from .. import create_local_model, runtime
from .. import distributed as dist
from ..data import build_datasets
from . import checkpoint as ckpt_io
from . import safety
from .config import FIELD_NAMES, TrainConfig, load_yaml, merge
from .loop import (  # noqa: F401  (evaluate_modules, warmup_cosine: importable from here as before)
    evaluate_backbone,
    evaluate_modules,
    make_optimizer,
    make_scheduler,
    optimizer_step,
    warmup_cosine,
)

RUN_FILES = ("metrics.jsonl", "metrics.json", "last.pt", "best.pt")


class EpochSampler(Sampler[int]):
    """A permutation of ``range(n)`` fixed by ``(seed, epoch)``, so a resumed run sees the same order; with
    ``skip`` the first indices are left out (resuming in the middle of an epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        yield from torch.randperm(self.n, generator=g).tolist()

    def __len__(self) -> int:
        return self.n


class _Skip(Sampler[int]):
    """Any sampler without its first ``skip`` indices."""

    def __init__(self, base: Sampler, skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator[int]:
        for i, index in enumerate(self.base):
            if i >= self.skip:
                yield index

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): the CUDA caching allocator's peak on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss"


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


class Trainer:
    """One training run. Build (validates, writes nothing), then :meth:`fit`."""

    def __init__(
        self,
        config: TrainConfig,
        resume_checkpoint: dict | None = None,
        resume_path: str | os.PathLike | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        cfg = config.resolve()
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self._log = log or print
        self.resume_path = resume_path
        self._lock = safety.RunFolderLock(self.out)  # held while fit() runs
        self.ctx = dist.init_from_env(cfg.device)  # torchrun's environment, or a single process
        self.device = self.ctx.device
        try:
            self._build(resume_checkpoint)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Give up the output folder and leave the process group (torchrun)."""
        self._lock.release()
        dist.cleanup(self.ctx)

    def _build(self, resume_checkpoint: dict | None) -> None:
        cfg = self.cfg

        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError as err:
                raise ValueError(
                    f"--tensorboard needs the tensorboard package ({err}): pip install tensorboard"
                ) from err

        # data
        self.train_set, self.test_set, self.info = build_datasets(
            cfg.dataset,
            cfg.data_root,
            download=cfg.download,
            train_samples=cfg.train_samples,
            test_samples=cfg.test_samples,
            synthetic_train_size=cfg.synthetic_train_size,
            synthetic_test_size=cfg.synthetic_test_size,
            synthetic_image_size=cfg.synthetic_image_size,
        )

        # model (engine ValueErrors: K out of range, bad options)
        _seed_everything(cfg.seed)
        self.model = create_local_model(
            cfg.arch,
            method=cfg.method,
            num_local_modules=cfg.local_modules,
            num_classes=self.info.num_classes,
            in_channels=self.info.in_channels,
            image_size=cfg.image_size or self.info.image_size,
            **cfg.engine_options(self.info.mean, self.info.std),
        )
        if self.ctx.world_size > 1:
            # Every rank built the same model from cfg.seed; from here each draws its own random numbers, so
            # that ranks do not apply the same crop/flip sequence to their shards (timm's seed + rank).
            _seed_everything(rank_seed(cfg.seed, self.ctx.rank, step=0))
        self.epoch, self.epoch_step, self.step = 0, 0, 0
        self.best_accuracy, self.best_epoch, self.wall_time_before = -1.0, 0, 0.0
        self._rng_to_restore = None
        self._partial = _no_partial()  # the epoch in progress, not yet logged (restored from mid-epoch saves)
        self._saved_step: int | None = None  # step of the last checkpoint written or resumed from
        self._stop = safety.StopSignals()  # entered by fit(): SIGINT/SIGTERM stop at a step boundary
        self._fit_start = time.perf_counter()
        if resume_checkpoint is not None:
            ckpt_io.check_compatible(resume_checkpoint, cfg.arch, cfg.method, cfg.local_modules, self.resume_path)
            try:
                self.model.load_state_dict(resume_checkpoint["model"])
            except RuntimeError as err:
                first = str(err).strip().splitlines()[0]
                raise ValueError(f"checkpoint {self.resume_path} does not fit this model: {first}") from err
        # checked last, so that a bad name, K or data root is reported as such even in a used folder;
        # nothing in the output folder is touched unless resuming or told to overwrite (checked again by fit(),
        # under the folder's lock, in case another run got there in between)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"output dir {self.out} exists and is not a folder")
        self._check_no_other_run(resume_checkpoint is not None)
        safety.check_output_dir(self.out)
        self._use_fast_path()
        self.model = dist.prepare_model(self.model, self.ctx, cfg.sync_bn)
        self.averager = dist.GradientAverager(self.model, self.ctx)

        # loaders, optimizer, schedule
        self.workers = cfg.resolved_workers(self.device.type)
        self.sampler = self._train_sampler()
        self.steps_per_epoch = len(self._train_loader(0))
        self._check_batch_of_one()
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, round(cfg.warmup_epochs * self.steps_per_epoch),
                                        self.total_steps)
        if resume_checkpoint is not None:
            self._restore(resume_checkpoint)

    def _check_no_other_run(self, resuming: bool) -> None:
        existing = [name for name in RUN_FILES if (self.out / name).exists()]
        if existing and not resuming and not self.cfg.overwrite:
            raise safety.RunFolderInUse(
                f"output dir {self.out} already holds a run ({', '.join(existing)}); "
                "pass --resume to continue it, --overwrite to replace it, or another --output-dir"
            )

    def _own_output_dir(self) -> None:
        """Take the output folder's lock before anything is written (rank 0; every rank learns whether it got
        it), and check under it that no other run has been written there since the build. On refusal
        (:class:`~mlaan.training.safety.RunFolderInUse`) the folder is left as it was."""
        refused: Exception | None = None
        if self.ctx.is_main:
            try:
                self._lock.acquire()
                self._check_no_other_run(self.resume_path is not None)
            except (ValueError, OSError) as err:
                self._lock.abandon()
                refused = err
        if self._reduce({"refused_count": float(refused is not None)})["refused_count"] > 0:
            raise refused if refused is not None else safety.RunFolderInUse(
                f"output dir {self.out} is not free: rank 0 could not take it (see its message)")

    # -------------------------------------------------------------------------------------- building
    def _use_fast_path(self) -> None:
        """bf16 autocast, channels-last and the thread count (``mlaan.runtime``), before the optimizer exists."""
        cfg = self.cfg
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.ctx.enabled else 1
        self.fast_path, warnings = runtime.resolve_fast_path(
            self.device, cfg.amp, cfg.channels_last, cfg.threads, share=local_processes
        )
        for warning in warnings:
            if self.ctx.is_main:
                print(f"mlaan: warning: {warning}", file=sys.stderr)
        runtime.apply_threads(self.fast_path.threads)
        self.model.autocast_dtype = self.fast_path.autocast_dtype
        self.model.set_channels_last(self.fast_path.channels_last)

    def _check_batch_of_one(self) -> None:
        """Refuse up front a run whose batches can hold one image while a BatchNorm layer sees a 1×1 map: it
        would crash in that layer at its first step (a whole data set smaller than the batch is one batch)."""
        cfg = self.cfg
        smallest = min(cfg.batch_size, len(self.sampler))
        if smallest > 1 or (cfg.sync_bn and self.ctx.world_size > 1):  # SyncBatchNorm sees every rank's image
            return
        layers = self.local_model.single_value_batchnorms()
        if layers:
            why = "--batch-size 1" if cfg.batch_size == 1 else f"a training set of {len(self.sampler)} image"
            raise ValueError(
                f"{why} cannot train {cfg.arch} on {self.info.image_size}x{self.info.image_size} images: BatchNorm "
                f"layer {layers[0]} sees a 1x1 map, i.e. one value per channel in a batch of one; use "
                "--batch-size 2 or more"
            )

    def _train_sampler(self) -> Sampler:
        sampler = dist.make_train_sampler(self.train_set, self.ctx, self.cfg.seed)  # None in one process
        return sampler if sampler is not None else EpochSampler(len(self.train_set), self.cfg.seed)

    def _loader_generator(self, epoch: int) -> torch.Generator:
        """The DataLoader's own generator (worker seeds), fixed by (seed, epoch, rank): building a loader
        draws nothing from the global RNG, which the augmentations use and a checkpoint restores."""
        return torch.Generator().manual_seed((self.cfg.seed * 1000003 + epoch) * 1009 + self.ctx.rank)

    def _train_loader(self, skip_samples: int, epoch: int = 0) -> DataLoader:
        sampler = _Skip(self.sampler, skip_samples) if skip_samples else self.sampler
        return DataLoader(
            self.train_set,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            generator=self._loader_generator(epoch),
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            drop_last=len(sampler) >= self.cfg.batch_size,  # no batch of one (BatchNorm) unless all is tiny
            persistent_workers=False,
            worker_init_fn=safety.ignore_stop_signals if self.workers > 0 else None,
        )

    def _test_loader(self) -> DataLoader:
        return DataLoader(
            self.test_set,
            sampler=dist.make_eval_sampler(self.test_set, self.ctx),  # a disjoint shard per rank, or None
            generator=self._loader_generator(-1),
            batch_size=self.cfg.eval_batch_size or 2 * self.cfg.batch_size,
            shuffle=False,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
        )

    def _restore(self, ckpt: dict) -> None:
        # checked here, so that a checkpoint that does not fit is an error before anything is written
        safety.load_optimizer_and_scheduler(self.optimizer, self.scheduler, ckpt, self.resume_path)
        if ckpt.get("rng") is not None:
            safety.check_rng_state(ckpt["rng"], self.resume_path)
        safety.check_position(ckpt, self.steps_per_epoch, self.resume_path)
        self.epoch, self.epoch_step, self.step = int(ckpt["epoch"]), int(ckpt["epoch_step"]), int(ckpt["step"])
        self.best_accuracy, self.best_epoch = float(ckpt["best_accuracy"]), int(ckpt["best_epoch"])
        self.wall_time_before = float(ckpt.get("wall_time", 0.0))
        self._rng_to_restore = ckpt.get("rng")
        partial = ckpt.get("epoch_partial")
        if isinstance(partial, dict):
            self._partial = {k: float(partial.get(k, 0.0)) for k in _no_partial() if k != _MODULE_SUMS}
            self._partial[_MODULE_SUMS] = {
                name: [None if v is None else float(v) for v in values]
                for name, values in (partial.get(_MODULE_SUMS) or {}).items()
            }
        self._saved_step = self.step

    @property
    def local_model(self):
        """The LocalModel (``prepare_model`` may return it wrapped)."""
        return getattr(self.model, "module", self.model)

    # ---------------------------------------------------------------------------------------- logging
    def log(self, message: str) -> None:
        if self.ctx.is_main:
            self._log(message)

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        """Sums across ranks (the keys are counts and sums, which ``reduce_metrics`` adds up)."""
        return dist.reduce_metrics(values, self.ctx)

    # ------------------------------------------------------------------------------------------ train
    def fit(self) -> dict[str, Any]:
        """Train to ``epochs`` (or ``max_steps``); returns what is written to ``metrics.json``."""
        cfg = self.cfg
        start = self._fit_start = time.perf_counter()
        writer = None
        self._own_output_dir()
        if self.ctx.is_main:
            self._guarded_write(self._prepare_output_dir, self.out)
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(self.out / "tensorboard"))
        self.ctx.barrier()
        if self._rng_to_restore is not None:
            ckpt_io.set_rng_state(self._rng_to_restore)
            if self.ctx.world_size > 1:  # the checkpoint holds rank 0's streams: give each rank its own again
                _seed_everything(rank_seed(cfg.seed, self.ctx.rank, self.step))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.log(self._banner())

        last_eval: dict[str, float] | None = None
        self._stop.__enter__()
        try:
            while self.epoch < cfg.epochs and not self._max_steps_reached():
                epoch = self.epoch
                if self._stop_requested():  # a signal during the last evaluation or save
                    self._stop_now()
                train = self._train_epoch(epoch, writer)
                last_eval = self.evaluate()
                complete = train["batches_done"] >= self.steps_per_epoch
                record = self._record(epoch, train, last_eval, complete)
                if last_eval["accuracy"] > self.best_accuracy:
                    self.best_accuracy, self.best_epoch = last_eval["accuracy"], epoch + 1
                    record["best"] = True
                if complete:
                    self.epoch, self.epoch_step = epoch + 1, 0
                    self._partial = _no_partial()  # logged now
                else:  # stopped by --max-steps: the checkpoint keeps the sums, so a resume covers the whole epoch
                    self.epoch_step = train["batches_done"]
                self._end_of_epoch(record, writer, start)
            if last_eval is None:  # nothing left to train (finished or max_steps already reached): evaluate
                last_eval = self.evaluate()
                if self.best_accuracy < 0:
                    self.best_accuracy, self.best_epoch = last_eval["accuracy"], self.epoch
            summary = self._summary(last_eval, start)
            if self.ctx.is_main:
                text = json.dumps(summary, indent=2) + "\n"
                self._guarded_write(lambda: ckpt_io.atomic_write_text(text, self.out / "metrics.json"),
                                    self.out / "metrics.json")
                self._print_summary(summary)
        finally:
            self._stop.__exit__()
            if writer is not None:
                writer.close()
            self._lock.release()  # after the last write
        self.ctx.barrier()
        return summary

    def _max_steps_reached(self) -> bool:
        return self.cfg.max_steps is not None and self.step >= self.cfg.max_steps

    def _train_epoch(self, epoch: int, writer) -> dict[str, float]:
        cfg, model = self.cfg, self.local_model
        model.train()
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        skip = self.epoch_step  # > 0 only when resuming in the middle of this epoch
        loader = self._train_loader(skip * cfg.batch_size, epoch)
        p = self._partial  # sums of this epoch's steps before a mid-epoch checkpoint (zeros otherwise)
        loss_sum, correct, count, seconds_before = p["loss_sum"], p["correct"], p["count"], p["seconds"]
        module_sums = {name: list(values) for name, values in p[_MODULE_SUMS].items()}
        batches_done = skip
        t0 = time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            total=len(loader),
            disable=not self.ctx.is_main,
            leave=False,
            dynamic_ncols=True,
            mininterval=1.0,
            file=sys.stderr,
        )
        for images, targets in bar:
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            try:
                stats = optimizer_step(model, self.optimizer, images, targets, self.averager.wait)
            except FloatingPointError as err:  # raised before any optimizer step: nothing is changed or saved
                raise FloatingPointError(f"{err} at step {self.step + 1} (epoch {epoch + 1}); "
                                         f"{self._kept_checkpoint()}") from err
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            self.step += 1
            batches_done += 1
            n = len(targets)
            loss_sum += stats["loss"] * n
            correct += stats["accuracy"] * n
            count += n
            _add_module_losses(module_sums, stats, n)
            seconds = seconds_before + time.perf_counter() - t0
            rate = count * self.ctx.world_size / max(seconds, 1e-9)
            self._partial = {"loss_sum": loss_sum, "correct": correct, "count": count, "seconds": seconds,
                             _MODULE_SUMS: module_sums}
            bar.set_postfix(
                loss=f"{loss_sum / count:.3f}", acc=f"{100 * correct / count:.1f}%", img_s=f"{rate:.0f}",
                lr=f"{lr:.4g}", refresh=False,
            )
            if writer is not None:
                writer.add_scalar("train/step_loss", stats["loss"], self.step)
                writer.add_scalar("train/lr", lr, self.step)
            self._between_steps(batches_done)
            if self._max_steps_reached():
                break
        bar.close()
        elapsed = seconds_before + time.perf_counter() - t0
        totals = self._reduce({"loss_sum": loss_sum, "correct": correct, "count": count, **{
            f"{name}/{j}": 0.0 if v is None else v for name, values in module_sums.items() for j, v in enumerate(values)
        }})
        return {
            "module_losses": {
                name: [None if v is None else totals[f"{name}/{j}"] / max(totals["count"], 1)
                       for j, v in enumerate(values)]
                for name, values in module_sums.items()
            },
            "loss": totals["loss_sum"] / max(totals["count"], 1),
            "accuracy": totals["correct"] / max(totals["count"], 1),
            "images": count * self.ctx.world_size,
            "seconds": elapsed,
            "images_per_second": count * self.ctx.world_size / max(elapsed, 1e-9),
            "batches_done": batches_done,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Test loss and top-1 accuracy of the plain backbone."""
        return evaluate_backbone(
            self.local_model.backbone, self._test_loader(), self.device, self.local_model.autocast_dtype,
            reduce=self._reduce, channels_last=self.local_model.channels_last,
        )

    # ------------------------------------------------------------------------------------ bookkeeping
    def _record(self, epoch: int, train: dict, test: dict, complete: bool) -> dict[str, Any]:
        mem, kind = peak_memory(self.device)
        return {
            "epoch": epoch + 1,
            "step": self.step,
            "complete": complete,
            "train_loss": train["loss"],
            "train_accuracy": train["accuracy"],
            # per local module, this epoch's mean training loss of its independent and cascaded aux nets
            "train_independent_losses": train["module_losses"].get("independent_losses"),
            "train_cascaded_losses": train["module_losses"].get("cascaded_losses"),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "test_error": 1.0 - test["accuracy"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_second": train["images_per_second"],
            "epoch_seconds": train["seconds"],
            "peak_memory_bytes": mem,
            "peak_memory_kind": kind,
        }

    def _end_of_epoch(self, record: dict, writer, start: float) -> None:
        if self.ctx.is_main:
            self._guarded_write(lambda: _log_epoch(self.out / "metrics.jsonl", record), self.out / "metrics.jsonl")
            state = self.checkpoint_state(time.perf_counter() - start)
            self._guarded_write(lambda: ckpt_io.atomic_save(state, self.out / "last.pt"), self.out / "last.pt")
            self._saved_step = self.step
            if record.get("best"):
                self._guarded_write(lambda: ckpt_io.atomic_save(state, self.out / "best.pt"), self.out / "best.pt")
            if writer is not None:
                for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_second"):
                    group, _, name = key.partition("_")
                    writer.add_scalar(f"{group}/{name}", record[key], record["step"])
                writer.flush()
            partial = "" if record["complete"] else f" (stopped at step {record['step']}, --max-steps)"
            self.log(
                f"epoch {record['epoch']}/{self.cfg.epochs}{partial}: "
                f"train loss {record['train_loss']:.4f} acc {100 * record['train_accuracy']:.2f}% | "
                f"test loss {record['test_loss']:.4f} acc {100 * record['test_accuracy']:.2f}% | "
                f"best {100 * self.best_accuracy:.2f}% | lr {record['lr']:.4g} | "
                f"{record['images_per_second']:.0f} img/s | {record['epoch_seconds']:.1f}s"
            )
        self.ctx.barrier()

    def checkpoint_state(self, wall_time: float) -> dict[str, Any]:
        info = self.info
        return {
            "format": ckpt_io.FORMAT,
            "version": ckpt_io.VERSION,
            "arch": self.cfg.arch,
            "method": self.cfg.method,
            "local_modules": self.cfg.local_modules,
            "dataset": info.name,
            "data_source": info.source,  # where the files were read from (may differ from config's data_root)
            "num_classes": info.num_classes,
            "in_channels": info.in_channels,
            "image_size": self.cfg.image_size or info.image_size,  # what the model was built for
            "mean": list(info.mean),
            "std": list(info.std),
            "model": self.local_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "step": self.step,
            "best_accuracy": self.best_accuracy,
            "best_epoch": self.best_epoch,
            "wall_time": self.wall_time_before + wall_time,
            "config": self.cfg.to_dict(),
            "rng": ckpt_io.rng_state(),
            "epoch_partial": dict(self._partial),
        }

    # ------------------------------------------------------------------------ saves, signals, failures
    def _between_steps(self, batches_done: int) -> None:
        """At a step boundary: the periodic checkpoint (``save_every``) and the stop signal."""
        self.epoch_step = batches_done
        stop = self._stop_requested()
        every = self.cfg.save_every
        # the end of an epoch and a --max-steps stop save anyway, after the evaluation
        mid_epoch = batches_done < self.steps_per_epoch and not self._max_steps_reached()
        if stop:
            self._stop_now()
        if every and self.step % every == 0 and mid_epoch:
            self._save_last()

    def _stop_requested(self) -> bool:
        received = self._stop.received is not None
        if self.ctx.synchronising:  # every rank stops at the same step
            received = self._reduce({"stop_count": float(received)})["stop_count"] > 0
        return received

    def _stop_now(self) -> None:
        """Save at this step boundary and raise RunStopped, saying how to resume."""
        self._save_last()
        name = safety.StopSignals.name(self._stop.received or 15)
        raise safety.RunStopped(
            f"stopped by {name} at step {self.step} (epoch {self.epoch + 1}, {self.epoch_step}/"
            f"{self.steps_per_epoch} steps); saved {self.out / 'last.pt'}; resume with: "
            f"mlaan train --output-dir {self.out} --resume",
            self._stop.received or 15,
        )

    def _save_last(self) -> None:
        if self.ctx.is_main:
            state = self.checkpoint_state(time.perf_counter() - self._fit_start)
            self._guarded_write(lambda: ckpt_io.atomic_save(state, self.out / "last.pt"), self.out / "last.pt")
        self._saved_step = self.step

    def _kept_checkpoint(self) -> str:
        last = self.out / "last.pt"
        if self._saved_step is None or not last.is_file():
            return "no checkpoint had been written yet"
        return f"the last good checkpoint, {last} (step {self._saved_step}), is kept"

    def _guarded_write(self, write: Callable[[], Any], path: Path) -> None:
        """Run ``write``; an OSError (disk full, read-only folder) becomes an OutputWriteError that says
        what was not written and which checkpoint is intact."""
        try:
            write()
        except OSError as err:
            if isinstance(err, safety.OutputWriteError):
                raise
            kept = self._kept_checkpoint()
            hint = f"; fix that, then resume with: mlaan train --output-dir {self.out} --resume" if (
                self._saved_step is not None) else ""
            raise safety.OutputWriteError(
                f"could not write {path}: {err.strerror or err}; {kept}{hint}"
            ) from err

    def _prepare_output_dir(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in safety.stale_temp_files(self.out, RUN_FILES):  # left by a run killed while saving
            stale.unlink(missing_ok=True)
        jsonl = self.out / "metrics.jsonl"
        if self.resume_path is None:  # a fresh run (validated: empty folder or --overwrite)
            for name in RUN_FILES:
                (self.out / name).unlink(missing_ok=True)
            return
        # resuming: keep the log lines up to the checkpoint, drop any written after it
        if jsonl.exists():
            kept = safety.read_metrics_lines(jsonl, self.step)  # drops a line cut short by a crash
            ckpt_io.atomic_write_text("".join(line + "\n" for line in kept), jsonl)
        (self.out / "metrics.json").unlink(missing_ok=True)

    def _summary(self, test: dict[str, float], start: float) -> dict[str, Any]:
        mem, kind = peak_memory(self.device)
        backbone_params = sum(p.numel() for p in self.local_model.backbone.parameters())
        all_params = sum(p.numel() for p in self.local_model.parameters())
        wall = time.perf_counter() - start
        return {
            "test_accuracy": test["accuracy"],
            "test_error": 1.0 - test["accuracy"],
            "test_loss": test["loss"],
            "best_accuracy": self.best_accuracy,
            "best_epoch": self.best_epoch,
            "peak_memory_bytes": mem,
            "peak_memory_kind": kind,
            "wall_time_seconds": wall,
            "total_wall_time_seconds": self.wall_time_before + wall,
            "steps": self.step,
            "epochs_completed": self.epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.ctx.world_size,
            "device": str(self.device),
            "parameters": {"backbone": backbone_params, "training_total": all_params},
            "split": [list(r) for r in self.local_model.split],
            "dataset": self.info.to_dict(),
            "resumed_from": str(self.resume_path) if self.resume_path is not None else None,
            "torch_version": torch.__version__,
            "fast_path": self.fast_path.to_dict(),
            "config": self.cfg.to_dict() | {"workers": self.workers},
            "outputs": {name: str(self.out / name) for name in RUN_FILES},
        }

    def _banner(self) -> str:
        cfg, info = self.cfg, self.info
        return (
            f"mlaan train: {cfg.arch} {cfg.method} K={cfg.local_modules} on {info.name} "
            f"({info.train_size} train / {info.test_size} test images, from {info.source}) | "
            f"{cfg.epochs} epochs x {self.steps_per_epoch} steps, batch {cfg.batch_size}, lr {cfg.lr} | "
            f"device {self.device}{' x' + str(self.ctx.world_size) if self.ctx.world_size > 1 else ''} "
            f"({self.fast_path.describe()}) | "
            f"output {self.out}"
        )

    def _print_summary(self, s: dict[str, Any]) -> None:
        cuda = s["peak_memory_kind"] == "cuda_max_memory_allocated"
        what = "CUDA peak allocated" if cuda else "peak RSS of the process"
        self.log(
            f"done: test accuracy {100 * s['test_accuracy']:.2f}% (error {100 * s['test_error']:.2f}%), "
            f"best {100 * s['best_accuracy']:.2f}% at epoch {s['best_epoch']}, {s['steps']} steps, "
            f"{s['wall_time_seconds']:.0f}s"
        )
        self.log(f"peak memory: {format_bytes(s['peak_memory_bytes'])} ({what})")
        present = [n for n in RUN_FILES if (self.out / n).exists()]
        self.log(f"outputs: {self.out}/ ({', '.join(present)})")


_MODULE_SUMS = "module_loss_sums"
_MODULE_KEYS = ("independent_losses", "cascaded_losses")


def _no_partial() -> dict[str, Any]:
    """The sums of an epoch before its first step (``module_loss_sums``: per-module loss sums by kind)."""
    return {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0, _MODULE_SUMS: {}}


def _add_module_losses(sums: dict[str, list], stats: dict, n: int) -> None:
    """Add a step's per-module losses (``train_step``'s independent/cascaded lists), weighted by batch size."""
    for name in _MODULE_KEYS:
        values = stats.get(name)
        if values is None:
            continue
        totals = sums.setdefault(name, [0.0 if v is not None else None for v in values])
        for j, v in enumerate(values):
            if v is not None and totals[j] is not None:
                totals[j] += v * n


def _log_epoch(path: Path, record: dict[str, Any]) -> None:
    """Add an epoch's line to ``metrics.jsonl``; a line of the same epoch cut short by ``--max-steps`` is replaced,
    since the resumed epoch's record covers all of its steps (one line per epoch)."""
    lines = path.read_text().splitlines() if path.exists() else []
    if lines:
        try:
            last = json.loads(lines[-1])
        except ValueError:
            last = None
        if isinstance(last, dict) and last.get("epoch") == record["epoch"] and last.get("complete") is False:
            text = "".join(line + "\n" for line in [*lines[:-1], json.dumps(record)])
            ckpt_io.atomic_write_text(text, path)
            return
    _append_line(path, json.dumps(record))


def _append_line(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A seed of its own for each (run seed, rank, step): distinct ranks never share a random stream."""
    return ((seed * 1_000_003 + step) * 1009 + rank) % 2**63


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


AUTO_RESUME = "auto"


def make_trainer(
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    resume: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> Trainer:
    """A validated :class:`Trainer` from the command line's pieces.

    Layers, later wins: defaults < the resumed checkpoint's config < ``config_file`` < ``overrides`` (the flags
    given explicitly). ``resume``: a checkpoint path, or ``"auto"`` for ``<output_dir>/last.pt``.
    """
    file_values = load_yaml(config_file) if config_file is not None else {}
    overrides = dict(overrides or {})
    ckpt_layer: dict[str, Any] = {}
    ckpt, path = None, None
    if resume is not None:
        if str(resume) == AUTO_RESUME:
            path = Path(merge(file_values, overrides).resolve().output_dir) / "last.pt"
            if not path.is_file():
                raise FileNotFoundError(f"--resume: nothing to resume, {path} does not exist")
        else:
            path = Path(resume)
        ckpt = ckpt_io.load_training_checkpoint(path)
        ckpt_layer = {k: v for k, v in ckpt.get("config", {}).items() if k in FIELD_NAMES}
        for per_invocation in ("overwrite", "max_steps"):  # a resumed run goes on to --epochs unless told
            ckpt_layer.pop(per_invocation, None)
        ckpt_layer["output_dir"] = str(path.parent)  # keep writing beside the checkpoint
    config = merge(ckpt_layer, file_values, overrides)
    explicit = merge(file_values, overrides)  # the values given for this invocation, converted
    given = {k: getattr(explicit, k) for k in {*file_values, *overrides}}
    if ckpt is not None and Path(config.output_dir).resolve() == path.parent.resolve():
        # continuing a run in its own folder: only where and how it runs may change (a fork into another
        # --output-dir may change anything but arch/method/K)
        safety.check_resume_config(ckpt.get("config", {}), given, path)
    if "data_root" in given:  # given explicitly: it must exist (no silent fallback to another copy)
        resolved = config.resolve()
        safety.check_data_root(resolved.dataset, resolved.data_root, resolved.download)
    return Trainer(config, ckpt, path, log)
