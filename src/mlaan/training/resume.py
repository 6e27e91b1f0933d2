"""Resuming a run: the checks that refuse a checkpoint another run's options, architecture or shape do not fit
(what may change is declared with each option, its resume policy: :data:`~mlaan.training.config.RESUME_FREE`), the
config layer a checkpoint gives a resumed run, and restoring its optimizer, scheduler, RNG states and place in the
epoch. Every check raises
ValueError with a one-line message naming the checkpoint, before anything is written.

:func:`resolve_run` puts a run's options together, new or resumed: defaults < the checkpoint's < ``--config`` <
the flags given.

The checkpoint file itself (schema, reading, writing) is :mod:`mlaan.training.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..distributed.modes import env_world_size
from ..engine.options import options_ignored, why_ignored
from . import safety
from .checkpoint import (
    LOAD_ERRORS,
    Progress,
    is_int,
    is_number,
    load_training_checkpoint,
    rng_state,
    saved_config,
    set_rng_state,
    short_error,
)
from .config import (
    PER_INVOCATION,
    RESUME_FREE,
    TrainConfig,
    coerce,
    load_yaml,
    merge,
    run_options_ignored,
    why_run_option_ignored,
)
from .run_folder import resume_path

IDENTITY_KEYS = ("arch", "method", "local_modules")


def check_compatible(ckpt: Mapping[str, Any], arch: str, method: str, local_modules: int,
                     path: str | os.PathLike | None) -> None:
    """ValueError for a checkpoint of another architecture, method or K, naming both values."""
    wanted = {"arch": arch, "method": method, "local_modules": local_modules}
    for key in IDENTITY_KEYS:
        if ckpt.get(key) != wanted[key]:
            flag = {"arch": "--arch", "method": "--method", "local_modules": "--local-modules"}[key]
            raise ValueError(
                f"checkpoint {path} is for {key}={ckpt.get(key)!r} but this run has {flag} {wanted[key]!r}; "
                f"resume it with {flag} {ckpt.get(key)!r}, or start a new run (no --resume) in another --output-dir"
            )


def resume_layer(ckpt: Mapping[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's options as the lowest layer of a resumed run's config (below ``--config`` and flags):
    without the per-invocation ``overwrite``/``max_steps``, and writing beside the checkpoint."""
    layer = saved_config(ckpt)
    for per_invocation in PER_INVOCATION:
        layer.pop(per_invocation, None)
    layer["output_dir"] = str(Path(path).parent)
    return layer


def check_resume_config(saved: Mapping[str, Any], given: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuse to resume with options (from flags or ``--config``) that change what the run computes.

    ``saved``: the checkpoint's config; ``given``: the values set explicitly for this invocation (already
    converted). Options in :data:`~mlaan.training.config.RESUME_FREE` may change; arch/method/K are checked by
    :func:`check_compatible`; another method's options change nothing in this run's, so they are not compared. An
    option the checkpoint lacks (added after the run started) counts as its default. The same whatever the output
    folder: a resumed run continues the checkpoint's optimizer and schedule, which ignore a changed ``lr`` or
    ``epochs``.
    ValueError listing every conflicting option.
    """
    conflicts = []
    # an option the checkpoint does not record is newer than the run, which therefore ran with its default
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    ignored = RESUME_FREE | set(IDENTITY_KEYS) | _unused_options(saved)
    for name, value in sorted(given.items()):
        if name in ignored or (name not in saved and name not in defaults):
            continue
        try:
            before = coerce(name, saved[name] if name in saved else defaults[name])
        except ValueError:
            continue
        if not _same(before, value):
            conflicts.append(f"{name}: {_show(before)} in the run, {_show(value)} given")
    if conflicts:
        raise ValueError(
            f"--resume: the options differ from those of the run in {Path(path).parent} "
            f"({'; '.join(conflicts)}); resume with the run's options, or start a new run in another --output-dir"
        )


def _unused_options(saved: Mapping[str, Any]) -> frozenset[str]:
    """The options the saved run ignores: its method's unread ones, and those read only with values of other
    options the run does not hold (none known when its method is missing or unknown here: then everything is
    compared)."""
    try:
        return options_ignored(saved["method"], dict(saved)) | run_options_ignored(saved)
    except (KeyError, ValueError):
        return run_options_ignored(saved)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _show(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value, default=str)


# ----------------------------------------------------------------------------------------------- restoring
def restore_training(
    ckpt: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    steps_per_epoch: int,
    path: str | os.PathLike | None,
) -> Progress:
    """Load the optimizer's and scheduler's states, check the RNG states and the place in the epoch against this
    run (ValueError, before anything is written), and return the run's :class:`Progress`. The RNG states
    themselves are set by the caller when training starts (:func:`~mlaan.training.checkpoint.set_rng_state`)."""
    load_optimizer_and_scheduler(optimizer, scheduler, ckpt, path)
    if ckpt.get("rng") is not None:
        check_rng_state(ckpt["rng"], path)
    check_position(ckpt, steps_per_epoch, path)
    return Progress(
        epoch=int(ckpt["epoch"]), epoch_step=int(ckpt["epoch_step"]), step=int(ckpt["step"]),
        best_accuracy=float(ckpt["best_accuracy"]), best_epoch=int(ckpt["best_epoch"]),
        best_step=int(ckpt.get("best_step", -1)), wall_time=float(ckpt.get("wall_time", 0.0)),
        peak_memory_bytes=int(ckpt.get("peak_memory_bytes", 0)), peak_memory_kind=str(ckpt.get("peak_memory_kind", "")),
    )


def load_optimizer_and_scheduler(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                                 ckpt: Mapping[str, Any], path: str | os.PathLike | None) -> None:
    """``load_state_dict`` both, then check what they hold, so that a checkpoint whose states do not fit this
    run is refused here (ValueError) rather than failing with a traceback in the middle of training."""
    expected = [set(group) for group in optimizer.param_groups]  # the options each group must have
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except LOAD_ERRORS as err:
        raise ValueError(f"checkpoint {path}: its optimizer state does not fit this run ({short_error(err)})") from err
    for i, group in enumerate(optimizer.param_groups):
        missing = sorted(expected[i] - set(group)) if i < len(expected) else []
        if missing:
            raise ValueError(f"checkpoint {path}: optimizer group {i} has no {', '.join(missing)}")
        for key in ("lr", "momentum", "dampening", "weight_decay"):
            if key in group and not is_number(group[key]):
                raise ValueError(f"checkpoint {path}: optimizer group {i} has {key}={group[key]!r}, not a number")
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None and not (isinstance(buf, torch.Tensor) and buf.shape == p.shape):
                raise ValueError(f"checkpoint {path}: a momentum buffer of the optimizer does not fit its parameter "
                                 f"({tuple(getattr(buf, 'shape', ()))} vs {tuple(p.shape)})")
    try:
        scheduler.load_state_dict(dict(ckpt["scheduler"]))  # a copy: LambdaLR pops from it
    except LOAD_ERRORS as err:
        raise ValueError(f"checkpoint {path}: its scheduler state does not fit this run ({short_error(err)})") from err
    if not (is_int(scheduler.last_epoch) and scheduler.last_epoch >= 0
            and all(is_number(x) for x in (*scheduler.base_lrs, *scheduler.get_last_lr()))
            and len(scheduler.base_lrs) == len(optimizer.param_groups)):
        raise ValueError(f"checkpoint {path}: its scheduler state is malformed")


def check_rng_state(state: Any, path: str | os.PathLike | None) -> None:
    """Try the checkpoint's RNG states (then put the current ones back): ValueError if they cannot be set."""
    current = rng_state()
    try:
        set_rng_state(state)
    except LOAD_ERRORS as err:
        raise ValueError(f"checkpoint {path}: its RNG states are damaged ({short_error(err)})") from err
    finally:
        set_rng_state(current)


def check_position(ckpt: Mapping[str, Any], steps_per_epoch: int, path: str | os.PathLike | None) -> None:
    """ValueError unless the saved place in the epoch exists in this run's epochs of ``steps_per_epoch`` steps."""
    if ckpt["epoch_step"] > steps_per_epoch:
        raise ValueError(
            f"checkpoint {path} stopped after step {ckpt['epoch_step']} of an epoch, but an epoch of this run has "
            f"{steps_per_epoch} steps: the data or the batch size differ from the run's"
        )


# ------------------------------------------------------------------------------------------ the run's shape

def schedule_shape(world_size: int, parallel: str, global_batch: int, steps_per_epoch: int, warmup_steps: int,
                   total_steps: int, replicas: int = 1) -> dict[str, Any]:
    """What a checkpoint records of the run's shape (``schedule``): its processes, how they split the work
    (``parallel``: "data", "modules", or "none" for one process), the images per optimizer step over all of them
    and the schedule's steps; ``replicas`` (recorded when more than 1): the pipeline replicas of ``--parallel
    modules --data-parallel R``, each on world_size / R processes."""
    shape = {"world_size": world_size, "parallel": parallel, "global_batch": global_batch,
             "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup_steps, "total_steps": total_steps}
    if replicas > 1:
        shape["replicas"] = replicas
    return shape


def saved_shape(ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
    """The shape of the run a checkpoint holds (:func:`schedule_shape`); for a checkpoint written before it was
    recorded, its steps per epoch alone when they can be told from its counters (an epoch completed); else None."""
    if "schedule" in ckpt:
        return dict(ckpt["schedule"])
    epoch, done = ckpt.get("epoch", 0), ckpt.get("step", 0) - ckpt.get("epoch_step", 0)
    if epoch > 0 and done > 0 and done % epoch == 0:
        return {"steps_per_epoch": done // epoch}
    return None


def shard_streams(ckpt: Mapping[str, Any]) -> list | None:
    """The checkpoint's RNG states (``rng_ranks``), one per data shard: every rank's under data parallelism, each
    replica's first stage's under pipeline replicas (rank d·P of replica d; its stages draw alike), so that a
    resume into a layout reading the same shards (2 × 2 ↔ ``--parallel data`` on 2) goes on with the same
    streams. None when it has none or they do not divide into its replicas."""
    ranks, shape = ckpt.get("rng_ranks"), ckpt.get("schedule") or {}
    if not isinstance(ranks, list) or not ranks:
        return None
    if shape.get("parallel") != "modules":  # data parallelism: a stream per rank
        return ranks
    replicas = shape.get("replicas", 1)
    if not isinstance(replicas, int) or replicas < 1 or len(ranks) % replicas:
        return None
    return ranks[:: len(ranks) // replicas]


def describe_shape(shape: Mapping[str, Any]) -> str:
    """E.g. "2 processes (--parallel data), a global batch of 32 (4 steps per epoch)"; "4 processes (--parallel
    modules --data-parallel 2), …" for pipeline replicas."""
    steps = f"{shape['steps_per_epoch']} steps per epoch"
    if "world_size" not in shape:
        return steps
    ranks = shape["world_size"]
    replicas = f" --data-parallel {shape['replicas']}" if shape.get("replicas", 1) > 1 else ""
    parallel = "" if shape["parallel"] == "none" else f" (--parallel {shape['parallel']}{replicas})"
    return (f"{ranks} process{'es' if ranks != 1 else ''}{parallel}, a global batch of {shape['global_batch']} "
            f"({steps})")


def check_schedule(ckpt: Mapping[str, Any], now: Mapping[str, Any], rescale: bool,
                   path: str | os.PathLike | None) -> dict[str, Any] | None:
    """Whether a resume keeps the run's shape: None when it does (or the checkpoint does not say), the saved shape
    when the global batch or the steps per epoch change and ``rescale`` (``--rescale-schedule``) allows it;
    ValueError (one line, naming both shapes and the flag) when they change without it. ``now``: this run's
    :func:`schedule_shape`."""
    saved = saved_shape(ckpt)
    if saved is None:
        return None
    same_batch = saved.get("global_batch", now["global_batch"]) == now["global_batch"]
    if same_batch and saved["steps_per_epoch"] == now["steps_per_epoch"]:
        return None
    if rescale:
        return saved
    if saved.get("replicas", 1) > 1:  # pipeline replicas: R shards of every batch, whatever the stages
        r = saved["replicas"]
        keep = (f"resume with --parallel modules --data-parallel {r} (any multiple of {r} processes, 2 or more "
                f"per replica) or on {r} processes with --parallel data --data-parallel 1")
    elif saved.get("parallel") == "data" and saved["world_size"] > 1:
        keep = f"resume on {saved['world_size']} processes with --parallel data"
    elif "world_size" in saved:
        keep = "resume in one process or with --parallel modules (any number of processes)"
    else:
        keep = "resume with the run's number of processes"
    raise ValueError(
        f"checkpoint {path} was trained with {describe_shape(saved)}, this run has {describe_shape(now)}: the "
        f"learning-rate schedule would no longer fit; {keep}, or pass --rescale-schedule to go on with the "
        "schedule rescaled to the new steps per epoch (same epochs and warm-up, lr 0 at the last step; not "
        "bit-identical to an uninterrupted run)"
    )


def rescaled_epoch_step(epoch_step: int, saved: Mapping[str, Any], now: Mapping[str, Any]) -> int:
    """The place in the epoch in progress, in this run's steps, of a run saved after ``epoch_step`` steps of its
    own shape ``saved``: the same number of images read (rounded down, so no image of the epoch is skipped), or
    the same fraction of the epoch when the saved global batch is not known."""
    if "global_batch" in saved:
        step = epoch_step * saved["global_batch"] // now["global_batch"]
    else:
        step = epoch_step * now["steps_per_epoch"] // saved["steps_per_epoch"]
    return min(step, now["steps_per_epoch"])


def saved_barriers(ckpt: Mapping[str, Any]) -> tuple[int, ...]:
    """The local modules after which the run's MLM cascades stop (``--boundary cut``: part of the algorithm); for
    a checkpoint written before they were recorded, the rank boundaries of its module-parallel partition when it
    cut there, else none."""
    if "cascade_barriers" in ckpt:
        return tuple(ckpt["cascade_barriers"])
    pipeline = ckpt.get("pipeline")
    if isinstance(pipeline, dict) and pipeline.get("boundary") == "cut":
        return tuple(stop - 1 for _, stop in pipeline["ranges"][:-1])
    return ()


# ------------------------------------------------------------------------------------ the run's options
def resolve_run(
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    resume: str | os.PathLike | None = None,
    check_data: bool = True,
    warn: bool = True,
) -> tuple[TrainConfig, dict[str, Any] | None, Path | None]:
    """The resolved config of a run, with the checkpoint it resumes from and that checkpoint's path (both None
    for a new run). Reads files, writes nothing: ``mlaan train --print-config`` shows what this returns.

    Layers, later wins: defaults < the resumed checkpoint's config < ``config_file`` (with its ``base`` files) <
    ``overrides`` (the flags given explicitly). ``resume``: a checkpoint path (a run folder: its ``last.pt``), or
    ``"auto"`` for ``<output_dir>/last.pt``. ValueError, FileNotFoundError or NotADirectoryError (one line each)
    for bad input; a ``data_root`` given explicitly must exist unless ``check_data`` is False. Options given that
    the run ignores are named in a warning on stderr unless ``warn`` is False.
    """
    file_values = load_yaml(config_file) if config_file is not None else {}
    overrides = dict(overrides or {})
    ckpt, path = None, None
    if resume is not None:
        path = resume_path(resume, file_values, overrides)
        ckpt = load_training_checkpoint(path)
    config = merge(resume_layer(ckpt, path) if ckpt is not None else {}, file_values, overrides)
    given = {k: coerce(k, v) for k, v in {**file_values, **overrides}.items()}  # this invocation's, converted
    if ckpt is not None:
        # a resumed run is the same run, in its own folder or another: only where and how it runs may change
        # (the optimizer and scheduler continue from the checkpoint whatever --lr or --epochs would say)
        check_resume_config(ckpt.get("config", {}), given, path)
    config = config.resolve()
    if ckpt is not None:  # also checked where the Trainer is built; here so that --print-config refuses it too
        check_compatible(ckpt, config.arch, config.method, config.local_modules, path)
    if check_data and "data_root" in given:  # given explicitly: it must exist (no silent fallback to another copy)
        safety.check_data_root(config.dataset, config.data_root, config.download)
    if warn:
        _warn_unused(file_values, overrides, config, resumed=ckpt is not None)
    return config, ckpt, path


def _unread_by_invocation(config: TrainConfig, resumed: bool) -> dict[str, str]:
    """Run options that this invocation, rather than the run's other options, leaves unread, each with why:
    ``rescale_schedule`` on a new run, ``sync_bn`` in one process (there is no other rank to synchronise with)."""
    unread = {}
    if config.rescale_schedule and not resumed:
        unread["rescale_schedule"] = "read only with --resume, this is a new run"
    if config.sync_bn and env_world_size() == 1:
        unread["sync_bn"] = "read only by a run of several processes (torchrun), this is one process"
    return unread


def _warn_unused(file_values: dict[str, Any], overrides: dict[str, Any], config: TrainConfig,
                 resumed: bool = False) -> None:
    """One line (from the first process) for options given (as flags or ``--config`` keys) that this run
    ignores: another method's, an engine option of a part its method does not have (``--window`` for dgl, say),
    one read only with other values of another option (``--aux-width`` with ``--aux-head linear``), or one this
    invocation does not read (``--rescale-schedule`` without ``--resume``), each with who reads it."""
    method, values = config.method, config.to_dict()
    run_unused = run_options_ignored(values)
    by_invocation = _unread_by_invocation(config, resumed)
    unused = sorted((set(file_values) | set(overrides))
                    & (options_ignored(method, values) | run_unused | set(by_invocation)))
    if unused and os.environ.get("RANK", "0") == "0":
        named = {name: "--" + name.replace("_", "-") if name in overrides else f"{name} (--config)" for name in unused}

        def why(name: str) -> str:
            if name in by_invocation:
                return by_invocation[name]
            return why_run_option_ignored(name, values) if name in run_unused else why_ignored(name, method, values)

        reasons = "; ".join(f"{named[name]}: {why(name)}" for name in unused)
        by = "this run" if set(unused) <= set(by_invocation) else f"--method {method} as configured"
        print(f"mlaan: warning: not used by {by}, ignored: {reasons}", file=sys.stderr)
