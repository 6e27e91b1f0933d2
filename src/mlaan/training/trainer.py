"""The training run of ``mlaan train``.

``make_trainer(config_file, overrides, resume)`` merges the options' layers and resolves them once;
``Trainer(config, resume_checkpoint, resume_path)`` then does everything that can fail on bad input — data, model,
K, the checkpoint to resume, the output folder — without writing anything; ``fit()`` trains and writes
``metrics.jsonl`` (a line per epoch), ``last.pt``/``best.pt`` (each epoch) and ``metrics.json`` (at the end).

The loop itself is in :mod:`mlaan.training.loop` (the recipe, ``optimizer_step``, ``train_one_epoch``,
``evaluate``); this class drives it and keeps the run's bookkeeping in rooms of its own: the checkpoint file
(:mod:`~mlaan.training.checkpoint`), what a resume may change and how it restores a run
(:mod:`~mlaan.training.resume`, with :func:`~mlaan.training.resume.resolve_run`, the run's options), the output
folder (:mod:`~mlaan.training.run_folder`), the data loaders (:mod:`~mlaan.training.sampling`), the partition of
a module-parallel run (:mod:`~mlaan.training.parallel`) and what the run prints and records
(:mod:`~mlaan.training.console`).

Distributed runs go through :mod:`mlaan.distributed` (``init_from_env``, ``prepare_model``,
``GradientAverager``, ``reduce_metrics``, ``make_train_sampler``); only rank 0 logs and writes.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import LocalModel, create_local_model, runtime
from .. import distributed as dist
from ..atomic import atomic_write_text
from ..data import build_datasets, data_option_keys
from . import checkpoint as ckpt_io
from . import console, loop, metrics_log, parallel, safety
from . import resume as resume_io
from .config import TrainConfig
from .resume import resolve_run
from .run_folder import RunFolder
from .sampling import RunLoaders, rank_seed, seed_everything


class Trainer:
    """One training run. Build (validates, writes nothing), then :meth:`fit`.

    ``config``: resolved (:meth:`TrainConfig.resolve`; :func:`make_trainer` does it); ``resume_checkpoint``: a
    checked training checkpoint (:func:`~mlaan.training.checkpoint.load_training_checkpoint`) loaded from
    ``resume_path``. ValueError (and FileNotFoundError for data) for bad input, before anything is written."""

    def __init__(
        self,
        config: TrainConfig,
        resume_checkpoint: dict | None = None,
        resume_path: str | os.PathLike | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if config.local_modules is None or config.output_dir is None:
            raise ValueError("Trainer needs a resolved config: pass config.resolve() (make_trainer resolves it)")
        self.cfg = config
        self.out = Path(config.output_dir)
        self._log = log or print
        self.resume_path = resume_path
        self.ctx = dist.init_from_env(config.device, config.dist_timeout)  # torchrun's environment, or a single process
        self.device = self.ctx.device
        self.folder = RunFolder(self.out, resume_path, config.overwrite, self.ctx.is_main)  # locked by fit()
        try:
            self._build(resume_checkpoint)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Give up the output folder and leave the process group (torchrun)."""
        self.folder.release()
        dist.cleanup(self.ctx)

    # -------------------------------------------------------------------------------------- building
    def _build(self, ckpt: dict | None) -> None:
        cfg = self.cfg
        # one process, data parallelism, a module pipeline or R replicas of one (refused in one line when they
        # do not fit the processes started)
        self.layout = parallel.RunLayout.of(cfg, self.ctx)
        safety.check_tensorboard(cfg.tensorboard)
        self._build_data()
        self._build_model()  # engine ValueErrors: K out of range, bad options
        self.progress = ckpt_io.Progress()  # counters a checkpoint saves (restored below when resuming)
        self.meter = loop.EpochMeter()  # the epoch in progress, not yet logged (restored from mid-epoch saves)
        self.checkpoints = ckpt_io.CheckpointSaver(self.out, writes=self.ctx.is_main)
        self._rng_to_restore = None
        self._rank_rng = None  # data parallelism: this rank's own RNG states in the checkpoint (same world size)
        self._rescaled: dict[str, Any] | None = None  # the saved run's shape, when --rescale-schedule changed it
        self._stop = safety.StopSignals()  # entered by fit(): SIGINT/SIGTERM stop at a step boundary
        self._writer = None  # TensorBoard, opened by fit()
        self._fit_start = time.perf_counter()
        self._barriers: tuple[int, ...] | None = None  # a resumed run's cut cascades (the algorithm), or None
        if ckpt is not None:
            resume_io.check_compatible(ckpt, cfg.arch, cfg.method, cfg.local_modules, self.resume_path)
            ckpt_io.load_model_state(self.model, ckpt["model"], self.resume_path)
            self._barriers = parallel.carry_barriers(self.local_model, ckpt, self.resume_path)
        self._use_fast_path()
        self.pipeline = None  # --parallel modules under torchrun: this rank's share (mlaan.distributed.pipeline)
        if self.layout.pipelined:  # built on the host; only this rank's modules move to the device
            self.pipeline = parallel.build_pipeline(self.local_model, cfg, self.ctx, ckpt, self._barriers,
                                                    self.resume_path, self.layout.mesh).to(self.device)
            self.averager = self.pipeline.gradient_averager(self.ctx)  # replicas: each stage's all-reduce
        else:
            self.model = dist.prepare_model(self.model, self.ctx, cfg.sync_bn)
            self.averager = dist.GradientAverager(self.model, self.ctx)
        self._build_optimization()
        if ckpt is not None:
            self._restore(ckpt)
        # checked last, so that a bad name, K, data root or checkpoint is reported as such even in a used folder
        self.folder.check()

    def _build_data(self) -> None:
        cfg = self.cfg
        self.train_set, self.test_set, self.info = build_datasets(
            cfg.dataset,
            cfg.data_root,
            download=cfg.download,
            train_samples=cfg.train_samples,
            test_samples=cfg.test_samples,
            **{key: getattr(cfg, key) for key in data_option_keys()},  # each data set's own options
        )

    def _build_model(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        self.model = create_local_model(
            cfg.arch,
            method=cfg.method,
            num_local_modules=cfg.local_modules,
            num_classes=self.info.num_classes,
            in_channels=self.info.in_channels,
            image_size=cfg.image_size or self.info.image_size,
            **cfg.engine_options(self.info.mean, self.info.std),
        )
        if self.resizes:  # asked for (--image-size, whose help says so) and said in the banner: no warning
            self.model.backbone.warn_on_resize = False
        if self.layout.own_random_streams:
            # Every rank built the same model from cfg.seed; from here each draws its own random numbers, so
            # that ranks do not apply the same crop/flip sequence to their shards (timm's seed + rank).
            seed_everything(rank_seed(cfg.seed, self.layout.stream_rank, step=0))

    @property
    def resizes(self) -> bool:
        """Whether ``--image-size`` differs from the data set's side: every batch is then resized to it."""
        return self.cfg.image_size is not None and self.cfg.image_size != self.info.image_size

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

    def _build_optimization(self) -> None:
        """Loaders' sampler, steps per epoch, optimizer and its per-step schedule (:mod:`mlaan.training.loop`)."""
        cfg = self.cfg
        self.workers = cfg.resolved_workers(self.device.type)
        self.loaders = RunLoaders(cfg, self.ctx, self.train_set, self.test_set, self.workers,
                                  self.layout.own_random_streams,
                                  replica=self.layout.replica_context(self.ctx))
        self.sampler = self.loaders.sampler
        self.steps_per_epoch = len(self.loaders.train(0))
        safety.check_batch_of_one(self.cfg, len(self.sampler), self.local_model, self.info.image_size,
                                  distributed=self.ctx.world_size > 1)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        warmup_steps = self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        if self.resume_path is None and self.ctx.is_main:  # only when the run starts: a resume cannot change it
            console.warn_of_warmup(cfg, warmup_steps, self.total_steps)
        if cfg.precise_bn * cfg.batch_size > len(self.train_set) and self.ctx.is_main:
            print(f"mlaan: warning: --precise-bn {cfg.precise_bn} asks for {cfg.precise_bn * cfg.batch_size} "
                  f"training images; the training set has {len(self.train_set)}, and precise BN uses them all",
                  file=sys.stderr)
        self.optimizer = loop.make_optimizer(self.model, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay,
                                             cfg.opt, cfg.betas, cfg.filter_bias_and_bn)
        # timm's Mixup/CutMix on training batches (None: off); probability targets reach train_step
        self.mix = loop.make_mixup(cfg.mixup, cfg.cutmix, cfg.label_smoothing, self.info.num_classes)
        self.scheduler = loop.make_scheduler(self.optimizer, warmup_steps, self.total_steps)

    @property
    def shape(self) -> dict[str, Any]:
        """The run's shape as its checkpoint records it (:func:`~mlaan.training.resume.schedule_shape`): a
        resume that changes its global batch changes its schedule (refused unless ``--rescale-schedule``)."""
        layout = self.layout
        batch = self.cfg.batch_size * layout.shards  # every stage of a pipeline (replica) reads its batch
        return resume_io.schedule_shape(layout.world_size, layout.parallel, batch, self.steps_per_epoch,
                                        self.warmup_steps, self.total_steps, replicas=layout.replicas)

    def _restore(self, ckpt: dict) -> None:
        # checked here, so that a checkpoint that does not fit is an error before anything is written
        shape = self.shape
        saved = resume_io.check_schedule(ckpt, shape, self.cfg.rescale_schedule, self.resume_path)
        if saved is not None:  # --rescale-schedule: the same place in the epoch, in this run's steps
            ckpt = {**ckpt, "epoch_step": resume_io.rescaled_epoch_step(ckpt["epoch_step"], saved, shape)}
        self.progress = resume_io.restore_training(ckpt, self.optimizer, self.scheduler, self.steps_per_epoch,
                                                   self.resume_path)
        if saved is not None:
            # the schedule of this run's shape, from the same place in it: the same epochs and warm-up (in this
            # run's steps), lr 0 at the last step; the step count (--max-steps, the logs) goes on as it was
            self._rescaled = saved
            position = self.progress.epoch * self.steps_per_epoch + self.progress.epoch_step
            self.scheduler = loop.make_scheduler(self.optimizer, self.warmup_steps, self.total_steps, start=position)
        self.meter = loop.EpochMeter.from_state(ckpt.get("epoch_partial"))
        if self.ctx.rank != 0:  # the checkpoint's sums are every rank's (_save_last): the first rank holds them
            # every stage of the first replica counts its images (ModulePipeline.reduce_sums divides by the stages)
            self.meter = self.meter.held_by_another_rank(keep_count=self.layout.pipelined and self.layout.replica == 0)
        self._rng_to_restore = ckpt.get("rng")  # set when training starts: building draws random numbers
        streams = resume_io.shard_streams(ckpt)
        layout = self.layout
        if layout.own_random_streams and saved is None and streams is not None and len(streams) == layout.shards:
            self._rank_rng = streams[layout.stream_rank]  # each shard's reader goes on with its streams, exactly
            resume_io.check_rng_state(self._rank_rng, self.resume_path)
        self.checkpoints.saved_step = self.progress.step

    @property
    def local_model(self) -> LocalModel:
        """The LocalModel (``prepare_model`` may return it wrapped)."""
        return getattr(self.model, "module", self.model)

    @property
    def step(self) -> int:
        """Optimizer steps taken so far, over the whole run."""
        return self.progress.step

    # ---------------------------------------------------------------------------------------- logging
    def log(self, message: str) -> None:
        """Show ``message`` (rank 0 only)."""
        if self.ctx.is_main:
            self._log(message)

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        """Sums across ranks: every key is a count or a sum (an epoch's ``independent_losses/0``, too, which
        ``reduce_metrics`` would otherwise average)."""
        return dist.reduce_metrics(values, self.ctx, sum_keys=values)

    # ------------------------------------------------------------------------------------------ train
    def fit(self) -> dict[str, Any]:
        """Train to ``epochs`` (or ``max_steps``); returns what is written to ``metrics.json`` (rank 0: the run's
        own, left as it was, when a resume finds nothing to train, :meth:`RunFolder.finished_run`). RunStopped on a
        stop signal (after saving), OutputWriteError when an output cannot be written, RunFolderInUse when another
        run holds the folder, FloatingPointError for a non-finite loss (the last checkpoint is kept)."""
        cfg, progress = self.cfg, self.progress
        start = self._fit_start = time.perf_counter()
        why = functools.partial(console.why_nothing_to_train, progress, cfg.epochs, cfg.max_steps)  # if asked
        finished = self.folder.finished_run(self._steps_left, why, self._reduce, self.log)
        if finished is not None:
            return finished
        self.folder.claim(self._reduce)
        if self.ctx.is_main:
            self.checkpoints.guard(lambda: self.folder.prepare(self.progress), self.out)
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.out / "tensorboard"))
        self.ctx.barrier()
        if self._rng_to_restore is not None:
            ckpt_io.set_rng_state(self._rng_to_restore)
            if self._rank_rng is not None:  # data parallelism on as many ranks: each rank's own streams
                ckpt_io.set_rng_state(self._rank_rng)
            elif self.layout.own_random_streams:  # another world size (or an older checkpoint): new streams
                seed_everything(rank_seed(cfg.seed, self.layout.stream_rank, progress.step))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.log(console.banner(self))
        if self._rescaled is not None:
            shapes = resume_io.describe_shape(self._rescaled), resume_io.describe_shape(self.shape)
            self.log(console.rescale_text(self, *shapes))

        last_eval: dict[str, float] | None = None
        self._stop.__enter__()
        try:
            while self._steps_left:
                if self._stop_requested():  # a signal during the last evaluation or save
                    self._stop_now()
                last_eval = self._run_epoch(progress.epoch)
            if last_eval is None:  # nothing left to train, but no metrics.json yet (RunFolder.finished_run): evaluate
                last_eval = self.evaluate()
                if progress.best_accuracy < 0:  # stopped before its first evaluation: this state is its best
                    progress.new_best(last_eval["accuracy"], progress.epoch)
                    self._save_last(best=True)  # so that the best_* of metrics.json name a best.pt that exists
            summary = console.run_summary(self, last_eval, start)
            self.folder.clear_replaced_run(self.checkpoints)
            if self.ctx.is_main:
                text = json.dumps(summary, indent=2) + "\n"
                self.checkpoints.guard(lambda: atomic_write_text(text, self.out / "metrics.json"),
                                       self.out / "metrics.json")
                console.print_summary(self, summary)
        finally:
            self._stop.__exit__()
            if self._writer is not None:
                self._writer.close()
            self.folder.release()  # after the last write
        self.ctx.barrier()
        return summary

    @property
    def _steps_left(self) -> bool:
        """Whether a training step is left to this invocation: epochs to go and ``max_steps`` not reached."""
        finished = metrics_log.schedule_finished(self.progress.epoch, self.cfg.epochs)  # bench/report's "finished"
        return not finished and not self._max_steps_reached()

    def _run_epoch(self, epoch: int) -> dict[str, float]:
        """Train (the rest of) ``epoch``, evaluate, log and save; returns the evaluation."""
        progress = self.progress
        train = self._train_epoch(epoch)
        test = self.evaluate()
        complete = progress.epoch_step >= self.steps_per_epoch
        record = console.epoch_record(self, epoch, train, test, complete)
        if test["accuracy"] > progress.best_accuracy:
            progress.new_best(test["accuracy"], epoch + 1)
            record["best"] = True
        if complete:
            progress.epoch, progress.epoch_step = epoch + 1, 0
            self.meter = loop.EpochMeter()  # logged now
        # else stopped by --max-steps: the checkpoint keeps the sums, so a resume covers the whole epoch
        self._end_of_epoch(record)
        return test

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        """The rest of ``epoch``, from ``progress.epoch_step`` (> 0 when resuming in its middle); its summary."""
        cfg, progress = self.cfg, self.progress
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        loader = self.loaders.train(progress.epoch_step * cfg.batch_size, epoch)
        try:
            loop.train_one_epoch(
                self.pipeline or self.local_model, self.optimizer, self.scheduler, loader, self.device, self.meter,
                wait_for_gradients=self.averager.wait if self.averager else None, after_step=self._after_step,
                progress=f"epoch {epoch + 1}/{cfg.epochs}" if self._shows_progress else None,
                world_size=self.layout.shards,
                batch_transform=self.mix, clip_grad=cfg.clip_grad,
            )
        except FloatingPointError as err:  # raised before that step changed anything: nothing is saved
            replaced = "; the run --overwrite was to replace is left as it was" if self.folder.replaced else ""
            raise FloatingPointError(f"{err} at step {progress.step + 1} (epoch {epoch + 1}); "
                                     f"{self.checkpoints.kept()}{replaced}") from err
        if self.pipeline is not None:
            return self.meter.summary(self.pipeline.reduce_sums, 1)
        return self.meter.summary(self._reduce, self.ctx.world_size)

    @property
    def _shows_progress(self) -> bool:
        """The rank with the progress bar: rank 0, or under module parallelism the last (which has the loss)."""
        if self.pipeline is not None:
            return self.ctx.rank == self.ctx.world_size - 1
        return self.ctx.is_main

    def _after_step(self, stats: dict, lr: float) -> bool:
        """At each step boundary: count the step, log it, the periodic checkpoint (``save_every``) and the stop
        signal. True when ``max_steps`` is reached (the epoch ends there)."""
        progress, every = self.progress, self.cfg.save_every
        progress.step += 1
        progress.epoch_step += 1
        if self._writer is not None:
            self._writer.add_scalar("train/step_loss", stats["loss"], progress.step)
            self._writer.add_scalar("train/lr", lr, progress.step)
        if self._stop_requested():
            self._stop_now()
        # the end of an epoch and a --max-steps stop save anyway, after the evaluation
        mid_epoch = progress.epoch_step < self.steps_per_epoch and not self._max_steps_reached()
        if every and progress.step % every == 0 and mid_epoch:
            self._save_last()
        return self._max_steps_reached()

    def _max_steps_reached(self) -> bool:
        return self.cfg.max_steps is not None and self.progress.step >= self.cfg.max_steps

    def evaluate(self) -> dict[str, float]:
        """Test loss and top-1 accuracy of the plain backbone (over every rank's shard); with ``precise_bn``, of a
        copy whose BatchNorm statistics are re-estimated on that many training batches (the same ones on every
        rank, drawn by (seed, step)), so that training is unchanged."""
        if self.pipeline is not None:  # each rank runs its own blocks
            return parallel.evaluate_pipeline(self.pipeline, self.cfg, self.train_set, self.loaders.test(),
                                              self.progress.step)
        model = self.local_model
        backbone = model.backbone
        if self.cfg.precise_bn and loop.has_batchnorm(backbone):
            backbone = copy.deepcopy(backbone)
            loop.precise_batchnorm(backbone, self.train_set, self.cfg.precise_bn, self.cfg.batch_size, self.device,
                                   seed=self.cfg.seed, step=self.progress.step, channels_last=model.channels_last)
        return loop.evaluate_backbone(backbone, self.loaders.test(), self.device, model.autocast_dtype,
                                      reduce=self._reduce, channels_last=model.channels_last)

    # ------------------------------------------------------------------------ saves, signals, failures
    def checkpoint_state(self, wall_time: float, merged: dict[str, Any] | None = None,
                         rng_ranks: list[dict[str, Any]] | None = None,
                         partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """The run's checkpoint now (:func:`~mlaan.training.checkpoint.training_state`); ``wall_time``: seconds
        trained in this invocation; ``merged``: a module-parallel run's merged shards; ``rng_ranks``: every rank's
        RNG states (data parallelism); ``partial``: the epoch's sums over every rank (None: this process's)."""
        return ckpt_io.training_state(self.cfg, self.info, self.local_model, self.optimizer, self.scheduler,
                                      self.progress, partial or self.meter.state_dict(), wall_time,
                                      runtime.peak_memory(self.device), merged, schedule=self.shape,
                                      rng_ranks=rng_ranks)

    def _save_last(self, best: bool = False) -> None:
        """Write ``last.pt`` (and ``best.pt``). Collective: under module parallelism every rank writes its shard
        first, rank 0 merges them and writes the manifest last."""
        merged = None
        self.folder.clear_replaced_run(self.checkpoints)
        # data parallelism: each rank's random streams are its own (its crops and flips), and so is their state
        own = self.layout.own_random_streams
        rng_ranks = dist.all_gather_objects(ckpt_io.rng_state(), self.ctx) if own else None
        # the epoch in progress as every rank counted it (a resume on any number of ranks logs each step once)
        partial = None
        if self.ctx.world_size > 1:
            partial = self.meter.reduced_state(self.pipeline.reduce_sums if self.pipeline is not None
                                               else self._reduce)
        if self.pipeline is not None:
            self.pipeline.drain()
            if self.layout.replica == 0:  # the replicas hold the same state: the first one's stages write it
                shard = self.pipeline.shard_state(self.optimizer)
                self.checkpoints.guard(lambda: parallel.write_shard(self.out, shard), self.out / ckpt_io.SHARDS)
            self.ctx.barrier()
            if self.ctx.is_main:
                merged = {**parallel.merge_shards(self.out, self.local_model, len(self.pipeline.ranges)),
                          "pipeline": self.pipeline.description()}
        self.checkpoints.save(
            lambda: self.checkpoint_state(time.perf_counter() - self._fit_start, merged, rng_ranks, partial),
            self.progress.step, best=best)
        if self.pipeline is not None:
            if self.ctx.is_main:
                self.checkpoints.guard(
                    lambda: parallel.write_manifest(self.out, self.pipeline.description(), self.progress.step),
                    self.out / ckpt_io.SHARDS / "manifest.json")
            self.ctx.barrier()

    def _end_of_epoch(self, record: dict) -> None:
        self.folder.clear_replaced_run(self.checkpoints)
        if self.ctx.is_main:
            jsonl = self.out / "metrics.jsonl"
            self.checkpoints.guard(lambda: metrics_log.log_epoch(jsonl, record), jsonl)
        self._save_last(best=record.get("best", False))
        if self._writer is not None:
            for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_second"):
                group, _, name = key.partition("_")
                self._writer.add_scalar(f"{group}/{name}", record[key], record["step"])
            self._writer.flush()
        self.log(console.epoch_text(record, self.cfg.epochs, self.progress.best_accuracy))
        self.ctx.barrier()

    def _stop_requested(self) -> bool:
        received = self._stop.received is not None
        if self.pipeline is not None:  # agreed a few steps later, without a per-step wait on every rank
            return self.pipeline.agree_to_stop(received)
        if self.ctx.synchronising:  # every rank stops at the same step
            received = self._reduce({"stop_count": float(received)})["stop_count"] > 0
        return received

    def _stop_now(self) -> None:
        """Save at this step boundary and raise RunStopped, saying how to resume."""
        self._save_last()
        name = safety.StopSignals.name(self._stop.received or 15)
        raise safety.RunStopped(
            f"stopped by {name} at {console.position(self.progress, self.steps_per_epoch)}; saved "
            f"{self.out / 'last.pt'}; resume with: "
            f"mlaan train --output-dir {shlex.quote(str(self.out))} --resume",
            self._stop.received or 15,
        )


def make_trainer(
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    resume: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> Trainer:
    """A validated :class:`Trainer` from the command line's pieces, its config merged and resolved here, once
    (:func:`~mlaan.training.resume.resolve_run`: the layers and the errors raised)."""
    config, ckpt, path = resolve_run(config_file, overrides, resume)
    return Trainer(config, ckpt, path, log)
