"""The training checkpoint, in one place: its schema, writing it, reading and checking it, restoring a run
from it, and exporting the backbone. Only tensors and plain data, written atomically (:mod:`mlaan.atomic`), read
with ``weights_only=True``.

A training checkpoint (``last.pt``/``best.pt``) is a dict::

    {"format": "mlaan-checkpoint", "version": 1,
     "arch", "method", "local_modules", "dataset", "data_source", "num_classes", "in_channels", "image_size",
     "mean", "std",
     "model": LocalModel.state_dict() (backbone, aux nets, EMA twins), "optimizer", "scheduler",
     "epoch": completed epochs, "epoch_step": steps done in the epoch after those, "step": optimizer steps,
     "best_accuracy", "best_epoch", "best_step", "wall_time", "config": TrainConfig.to_dict(), "rng": {...tensors...},
     "peak_memory_bytes", "peak_memory_kind": the run's peak memory up to this save, over all its invocations,
     "epoch_partial": the sums of the epoch in progress (mlaan.training.loop.EpochMeter),
     "schedule": the run's shape {"world_size", "parallel", "global_batch", "steps_per_epoch", "warmup_steps",
                 "total_steps"} (a resume with another global batch is refused unless --rescale-schedule),
     "cascade_barriers": the local modules after which MLM cascades stop ([] but under --boundary cut): part of
                         the algorithm, carried over by every resume,
     "rng_ranks": (data parallelism) every rank's RNG states, rank by rank,
     "pipeline": (a module-parallel run only) {"ranks", "ranges", "boundary"}}

A module-parallel run (``--parallel modules``) writes the same file: each rank first writes its shard
(``shards/rank<r>.pt``: its modules' entries and optimizer state), rank 0 merges them into ``last.pt`` and then
writes ``shards/manifest.json`` (ranks, partition, step, each shard's SHA-256) as the mark of a complete save.
So such a run resumes in one process, or with another number of ranks, like any other.

An export (``mlaan export``) is the plain backbone's ``state_dict`` alone (keys ``blocks.<i>.…``), with a
``.json`` file beside it saying how to build the network.

Every check raises ValueError (FileNotFoundError for a missing file) with a one-line message naming the file,
which ``mlaan`` reports with exit code 2 before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shlex
import shutil
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..atomic import atomic_save, atomic_write, atomic_write_text
from ..engine.options import options_ignored
from .config import FIELD_NAMES, TrainConfig, coerce, merge
from .safety import OutputWriteError

if TYPE_CHECKING:
    from ..data import DatasetInfo

FORMAT = "mlaan-checkpoint"
VERSION = 1
IDENTITY_KEYS = ("arch", "method", "local_modules")

# Options that may change between a run and its resumption: where and how it runs, not what it computes.
# (arch, method and local_modules are checked against the checkpoint itself, with their own message.)
RESUME_FREE = frozenset(
    {
        "max_steps",
        "overwrite",
        "device",
        "workers",
        "tensorboard",
        "download",
        "data_root",
        "output_dir",
        "eval_batch_size",
        "precise_bn",  # evaluation only: it re-estimates BatchNorm statistics on a copy (training is unchanged)
        "save_every",
        "grad_checkpointing",
        "checkpoint_segment",
        "checkpoint_modules",  # how BP's checkpointing is cut changes memory and time, not what a step computes
        "amp",  # precision, memory format and threads change how fast a run goes, and float rounding only
        "channels_last",
        "compile",  # torch.compile: the same step to float rounding, the same state_dict keys
        "threads",
        "extra",
        "parallel",  # a module-parallel run resumes in one process or with another number of ranks, and back
        "partition",
        "dist_timeout",
        "rescale_schedule",  # asks to go on with another global batch (check_schedule), per invocation
    }
)
# options of one invocation that a resumed run does not inherit (it goes on to --epochs unless told otherwise)
_PER_INVOCATION = ("overwrite", "max_steps", "rescale_schedule")


# ------------------------------------------------------------------------------------------------- reading
def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file ``path`` names: a run folder holding ``last.pt`` stands for that file, as a user who
    names a run means its latest state; any other path is returned as it is (a folder without ``last.pt`` is then
    refused by :func:`load`, which lists the checkpoints in it)."""
    if not str(path).strip():  # "" (an unset variable) would be Path("."): never taken for the current folder's run
        return Path(path)
    path = Path(path)
    return path / "last.pt" if path.is_dir() and (path / "last.pt").is_file() else path


def _named_file(path: str | os.PathLike) -> str | os.PathLike:
    """:func:`checkpoint_file` of a non-empty path; an empty one as it is, for :func:`load` to say it is empty
    (``Path("")`` would be the current folder, and its ``last.pt`` taken)."""
    return checkpoint_file(path) if str(path).strip() else path


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of any checkpoint or export, after checking its zip archive's CRCs; a run
    folder stands for its ``last.pt`` (:func:`checkpoint_file`).

    FileNotFoundError when ``path`` is not a file (IsADirectoryError: a folder without ``last.pt``); ValueError
    (naming the path) when it is damaged, not a checkpoint, or holds a pickled callable or class (refused, never
    called)."""
    if not str(path).strip():  # Path("") is the current folder: an unset shell variable, say so
        raise FileNotFoundError("the checkpoint path is empty: give a checkpoint file (last.pt, best.pt) or a run "
                                "folder")
    path = _named_file(path)
    if path.is_dir():  # a folder without last.pt
        inside = [str(path / name) for name in ("best.pt",) if (path / name).is_file()]
        what = f"holds no last.pt: give a checkpoint in it ({', '.join(inside)})" if inside else (
            "is a folder holding no checkpoint (last.pt, best.pt), not a checkpoint file")
        raise IsADirectoryError(f"checkpoint {path} {what}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    _check_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle / zip errors differ between versions: report them all the same way
        code = re.search(r"GLOBAL ([\w.]+)", str(err))
        if code is not None:  # a pickled callable or class: refused, never called
            raise ValueError(
                f"{path} is refused: it holds {code.group(1)}, not only tensors and plain data "
                "(checkpoints are read with torch.load(weights_only=True), which never runs code from a file)"
            ) from err
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}: {_reason(err)})") from err


def _reason(err: Exception) -> str:
    """What ``torch.load`` said, without the advice it gives for ``weights_only=True`` (to load the file with
    ``weights_only=False``, which would run any code in it): only its last word on what went wrong."""
    text = str(err)
    if "weights_only" in text and "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    return " ".join(text.split())[:200]


def _check_archive(path: Path) -> None:
    """torch.load does not check the CRC-32s of its zip archive, so a damaged copy could load with wrong
    weights: check them first (about a second per GB)."""
    if not zipfile.is_zipfile(path):
        return  # truncated or not a zip at all: torch.load says so
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as err:
        raise ValueError(f"{path} is not a readable checkpoint (damaged zip archive: {err})") from err
    if bad is not None:
        raise ValueError(f"{path} is corrupt: the checksum of {bad} inside it does not match (a damaged copy?)")


def is_training_checkpoint(obj: Any) -> bool:
    """Whether a loaded object claims to be a training checkpoint (its ``format`` field); not yet checked."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_training_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """:func:`load` a training checkpoint and check every field (:func:`check_training_checkpoint`).
    FileNotFoundError / ValueError as there, or when the file is an export rather than a training checkpoint."""
    path = _named_file(path)
    obj = load(path, map_location)
    if not is_training_checkpoint(obj):
        raise ValueError(f"{path} is not an mlaan training checkpoint (last.pt / best.pt written by mlaan train)")
    check_training_checkpoint(obj, path)
    return obj


def check_training_checkpoint(obj: Mapping[str, Any], path: str | os.PathLike) -> None:
    """ValueError if a training checkpoint has a missing or malformed field, or is from a newer mlaan."""
    check_checkpoint_fields(obj, path)
    if obj.get("version", 0) > VERSION:
        raise ValueError(f"{path} was written by a newer mlaan (checkpoint version {obj['version']} > {VERSION})")


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


def saved_config(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The run's options as the checkpoint saved them, less any key this version of mlaan does not know."""
    return {k: v for k, v in ckpt.get("config", {}).items() if k in FIELD_NAMES}


def resume_layer(ckpt: Mapping[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's options as the lowest layer of a resumed run's config (below ``--config`` and flags):
    without the per-invocation ``overwrite``/``max_steps``, and writing beside the checkpoint."""
    layer = saved_config(ckpt)
    for per_invocation in _PER_INVOCATION:
        layer.pop(per_invocation, None)
    layer["output_dir"] = str(Path(path).parent)
    return layer


def check_resume_config(saved: Mapping[str, Any], given: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuse to resume with options (from flags or ``--config``) that change what the run computes.

    ``saved``: the checkpoint's config; ``given``: the values set explicitly for this invocation (already
    converted). Options in :data:`RESUME_FREE` may change; arch/method/K are checked by :func:`check_compatible`;
    another method's options change nothing in this run's, so they are not compared. An option the checkpoint
    lacks (added after the run started) counts as its default. The same whatever the output folder: a resumed
    run continues the checkpoint's optimizer and schedule, which ignore a changed ``lr`` or ``epochs``.
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
        return options_ignored(saved["method"], dict(saved))
    except (KeyError, ValueError):
        return frozenset()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _show(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value, default=str)


# -------------------------------------------------------------------------------------------------- schema
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _tensor_dict(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


def _rng_states(v: Any) -> bool:
    def ok(x: Any) -> bool:
        return isinstance(x, torch.Tensor) or (isinstance(x, (list, tuple)) and all(ok(y) for y in x))

    return isinstance(v, dict) and all(isinstance(k, str) and ok(x) for k, x in v.items())


def _schedule(value: Any) -> bool:
    return (isinstance(value, dict) and all(_is_int(value.get(k)) and value[k] >= 0 for k in SCHEDULE_NUMBERS)
            and isinstance(value.get("parallel"), str))


def _epoch_partial(value: Any) -> bool:
    """The sums of an epoch in progress: numbers, and ``module_loss_sums``: {kind: [number or None, ...]}."""
    if not isinstance(value, dict):
        return False
    modules = value.get("module_loss_sums", {})
    lists_ok = isinstance(modules, dict) and all(
        isinstance(v, list) and all(x is None or _is_number(x) for x in v) for v in modules.values()
    )
    return lists_ok and all(_is_number(x) for k, x in value.items() if k != "module_loss_sums")


_CHECKPOINT_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "arch": ("a name", lambda v: isinstance(v, str)),
    "method": ("a name", lambda v: isinstance(v, str)),
    "dataset": ("a name", lambda v: isinstance(v, str)),
    "local_modules": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "num_classes": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "in_channels": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "image_size": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "mean": ("a list of numbers", lambda v: isinstance(v, (list, tuple)) and v and all(map(_is_number, v))),
    "std": ("a list of numbers", lambda v: isinstance(v, (list, tuple)) and v and all(map(_is_number, v))),
    "model": ("a state_dict of tensors", _tensor_dict),
    "optimizer": ("an optimizer state_dict",
                  lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                  and isinstance(v.get("param_groups"), list) and all(isinstance(g, dict) for g in v["param_groups"])),
    "scheduler": ("a scheduler state_dict", lambda v: isinstance(v, dict)),
    "epoch": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "epoch_step": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "step": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "best_accuracy": ("a number", _is_number),
    "best_epoch": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "config": ("a mapping of options", lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v)),
}
_OPTIONAL_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "rng": ("a mapping of RNG states", _rng_states),
    "epoch_partial": ("a mapping of numbers (and per-module lists of numbers)", _epoch_partial),
    "wall_time": ("a number", _is_number),
    "data_source": ("a path", lambda v: isinstance(v, str)),
    "version": ("an integer", _is_int),
    "best_step": ("an integer >= -1", lambda v: _is_int(v) and v >= -1),  # absent from checkpoints before it
    # absent from checkpoints before them: a run resumed from one reports the peak of its later invocations only
    "peak_memory_bytes": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "peak_memory_kind": ("a name", lambda v: isinstance(v, str)),
    # absent from checkpoints before them (see check_schedule, saved_barriers, the trainer's RNG restore)
    "schedule": ("a mapping of the run's shape (integers and the parallel mode)", lambda v: _schedule(v)),
    "cascade_barriers": ("a list of module indices", lambda v: isinstance(v, list) and all(_is_int(b) and b >= 0
                                                                                          for b in v)),
    "rng_ranks": ("a list of every rank's RNG states", lambda v: isinstance(v, list) and all(map(_rng_states, v))),
}


def check_checkpoint_fields(ckpt: Mapping[str, Any], path: str | os.PathLike) -> None:
    """ValueError naming the first field of a training checkpoint that is missing or of the wrong kind
    (a file that loads safely but was not written by ``mlaan train``, or was edited)."""
    for fields, required in ((_CHECKPOINT_FIELDS, True), (_OPTIONAL_FIELDS, False)):
        for key, (kind, ok) in fields.items():
            if key not in ckpt:
                if required:
                    raise ValueError(f"checkpoint {path} has no {key!r} field: not a complete mlaan checkpoint")
                continue
            if not ok(ckpt[key]):
                value = ckpt[key]
                # a plain value is shown (-5 for "an integer >= 0"), anything else by its type (a dict, a tensor)
                shown = repr(value) if isinstance(value, (bool, int, float, str, type(None))) and len(
                    repr(value)) <= 40 else f"a {type(value).__name__}"
                raise ValueError(f"checkpoint {path}: field {key!r} should be {kind}, got {shown}")


# ------------------------------------------------------------------------------------------------- writing
@dataclass
class Progress:
    """Where a run stands, as its checkpoint saves it and a resume restores it.

    ``epoch`` epochs completed, then ``epoch_step`` steps of the next; ``step`` optimizer steps in all; the best
    test accuracy so far, the epoch (counted from 1) and the step whose evaluation reached it (-1.0, 0 and -1
    before the first evaluation; the step tells an evaluation at a ``--max-steps`` stop inside an epoch from the
    one at that epoch's end); ``wall_time``: seconds trained by the run's earlier invocations;
    ``peak_memory_bytes``/``peak_memory_kind``: their peak memory (:func:`mlaan.runtime.peak_memory`; 0 and ""
    when none is known)."""

    epoch: int = 0
    epoch_step: int = 0
    step: int = 0
    best_accuracy: float = -1.0
    best_epoch: int = 0
    best_step: int = -1
    wall_time: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""

    def run_peak_memory(self, now: tuple[int, str]) -> tuple[int, str]:
        """The run's peak memory: the larger of ``now`` (this process's peak, as
        :func:`mlaan.runtime.peak_memory` gives it) and the earlier invocations' when measured the same way. A run
        resumed on another kind of device gets ``now`` alone: a CUDA peak and a process's RSS do not compare."""
        count, kind = now
        if kind == self.peak_memory_kind:
            return max(count, self.peak_memory_bytes), kind
        return count, kind

    def new_best(self, accuracy: float, epoch: int) -> None:
        """Record ``accuracy``, evaluated now (at ``step``, in ``epoch`` counted from 1), as the run's best."""
        self.best_accuracy, self.best_epoch, self.best_step = accuracy, epoch, self.step


def training_state(
    cfg: TrainConfig,
    info: DatasetInfo,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    epoch_partial: Mapping[str, Any],
    seconds: float,
    peak_memory: tuple[int, str],
    merged: Mapping[str, Any] | None = None,
    schedule: Mapping[str, Any] | None = None,
    rng_ranks: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The checkpoint of a run at a step boundary (the dict of the module docstring), ready for
    :func:`~mlaan.atomic.atomic_save`. ``model``: the unwrapped LocalModel; ``epoch_partial``: the sums of the
    epoch in progress; ``seconds``: trained in this invocation; ``peak_memory``: this process's peak memory
    (:func:`mlaan.runtime.peak_memory`), saved as the run's with the earlier invocations'; ``merged``: a
    module-parallel run's (:func:`merge_shards`): its ``model``, ``optimizer`` and ``pipeline`` replace this
    process's; ``schedule``: the run's shape (:func:`schedule_shape`); ``rng_ranks``: every rank's RNG states
    (data parallelism). Takes the RNG states now, so nothing may draw a random number between this call and the
    step it describes."""
    state = {
        "format": FORMAT,
        "version": VERSION,
        "arch": cfg.arch,
        "method": cfg.method,
        "local_modules": cfg.local_modules,
        "dataset": info.name,
        "data_source": info.source,  # where the files were read from (may differ from config's data_root)
        "num_classes": info.num_classes,
        "in_channels": info.in_channels,
        "image_size": cfg.image_size or info.image_size,  # what the model was built for
        "mean": list(info.mean),
        "std": list(info.std),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": progress.epoch,
        "epoch_step": progress.epoch_step,
        "step": progress.step,
        "best_accuracy": progress.best_accuracy,
        "best_epoch": progress.best_epoch,
        "best_step": progress.best_step,
        "wall_time": progress.wall_time + seconds,
        "config": cfg.to_dict(),
        "rng": rng_state(),
        "epoch_partial": dict(epoch_partial),
        # the cut cascades of --boundary cut are the algorithm: saved whoever trains the run next
        "cascade_barriers": sorted(model.options.cascade_barriers) if model.spec.cascade else [],
    }
    if schedule is not None:
        state["schedule"] = dict(schedule)
    if rng_ranks is not None:
        state["rng_ranks"] = list(rng_ranks)
    state["peak_memory_bytes"], state["peak_memory_kind"] = progress.run_peak_memory(peak_memory)
    if merged is not None:
        state.update(merged)
    return state


def carry_over(source: str | os.PathLike, progress: Progress, folder: str | os.PathLike) -> list[str]:
    """Resuming from ``source`` into another ``folder``: copy the checkpoint there as ``last.pt``, and the run's
    ``best.pt`` beside it when that is the best of the run as it stood at the checkpoint (``progress``, restored
    from it), so that the folder holds the run before its first save. Returns the names written. OSError when a
    copy fails (the target is then as it was)."""
    source, folder = Path(source), Path(folder)
    _copy_atomically(source, folder / "last.pt")
    best = source.parent / "best.pt"
    if best.is_file() and _is_best_up_to(best, progress):
        _copy_atomically(best, folder / "best.pt")
        return ["last.pt", "best.pt"]
    return ["last.pt"]


def _is_best_up_to(path: Path, progress: Progress) -> bool:
    """Whether ``path`` is the best checkpoint of the run at ``progress``: saved at or before that step and with the
    same best accuracy (a best.pt saved after the resumed checkpoint, or damaged, is not carried over)."""
    try:
        best = load_training_checkpoint(path)
    except (OSError, ValueError):
        return False
    return best["step"] <= progress.step and best["best_accuracy"] == progress.best_accuracy


def _copy_atomically(source: Path, target: Path) -> None:
    with open(source, "rb") as src:
        atomic_write(target, "wb", lambda f: shutil.copyfileobj(src, f))


# --------------------------------------------------------------------------------- module-parallel shards
SHARDS = "shards"


def write_shard(folder: str | os.PathLike, shard: Mapping[str, Any]) -> Path:
    """Write one rank's share of a checkpoint (``ModulePipeline.shard_state``) to
    ``folder/shards/rank<r>.pt``, atomically; returns the path."""
    path = Path(folder) / SHARDS / f"rank{shard['rank']}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(dict(shard), path)
    return path


def merge_shards(folder: str | os.PathLike, model: torch.nn.Module, ranks: int) -> dict[str, Any]:
    """The one-process ``model``/``optimizer`` states and the partition (``pipeline``) from the ``ranks`` shards
    in ``folder/shards`` (ValueError naming a missing or damaged shard)."""
    from ..distributed.pipeline import merge_model_states, merge_optimizer_states

    shards = []
    for r in range(ranks):
        path = Path(folder) / SHARDS / f"rank{r}.pt"
        try:
            shards.append(torch.load(path, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError, zipfile.BadZipFile) as err:
            raise ValueError(f"module-parallel shard {path} cannot be read: {_short(err)}") from err
    ranges = [range(a, b) for a, b in shards[0]["ranges"]]
    return {"model": merge_model_states(model, ranges, [s["model"] for s in shards]),
            "optimizer": merge_optimizer_states([s["optimizer"] for s in shards])}


def write_manifest(folder: str | os.PathLike, pipeline: Mapping[str, Any], step: int) -> Path:
    """``folder/shards/manifest.json``, written after ``last.pt``: the partition, the step and each shard's
    SHA-256 — the mark that the save of that step is complete."""
    import hashlib

    shards = Path(folder) / SHARDS
    files = [shards / f"rank{r}.pt" for r in range(pipeline["ranks"])]
    manifest = {"format": "mlaan-pipeline-manifest", "step": step, **pipeline,
                "shards": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}
    path = shards / "manifest.json"
    atomic_write_text(json.dumps(manifest, indent=2) + "\n", path)
    return path


class CheckpointSaver:
    """Writes a run's ``last.pt`` and ``best.pt`` into ``folder`` (only where ``writes``: rank 0) and remembers the
    step of the last good ``last.pt``, so that a failed write of any of the run's files says which checkpoint is
    still intact and how to resume (:class:`~mlaan.training.safety.OutputWriteError`)."""

    def __init__(self, folder: str | os.PathLike, writes: bool = True, saved_step: int | None = None) -> None:
        self.folder = Path(folder)
        self.writes = writes
        self.saved_step = saved_step  # step of the last checkpoint written or resumed from; None: none yet

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    def save(self, state: Callable[[], Mapping[str, Any]], step: int, best: bool = False) -> None:
        """Write ``state()`` (built only where this process writes) to ``last.pt``, and to ``best.pt`` too when
        ``best``; ``step``: the optimizer step it describes. OutputWriteError when a write fails."""
        if self.writes:
            built = state()
            self.guard(lambda: atomic_save(built, self.last), self.last)
            self.saved_step = step
            if best:
                self.guard(lambda: atomic_save(built, self.folder / "best.pt"), self.folder / "best.pt")
        else:
            self.saved_step = step

    def guard(self, write: Callable[[], Any], path: str | os.PathLike) -> None:
        """Run ``write``; an OSError (disk full, read-only folder) becomes an OutputWriteError naming ``path``
        and the checkpoint that is intact."""
        try:
            write()
        except OSError as err:
            if isinstance(err, OutputWriteError):
                raise
            resume = f"mlaan train --output-dir {shlex.quote(str(self.folder))} --resume"
            hint = f"; fix that, then resume with: {resume}" if self.saved_step is not None else ""
            raise OutputWriteError(f"could not write {path}: {err.strerror or err}; {self.kept()}{hint}") from err

    def kept(self) -> str:
        """Which checkpoint a run that fails now leaves behind, for its error message."""
        if self.saved_step is None or not self.last.is_file():
            return "no checkpoint had been written yet"
        return f"the last good checkpoint, {self.last} (step {self.saved_step}), is kept"


# ----------------------------------------------------------------------------------------------- restoring
_LOAD_ERRORS = (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError, OverflowError)


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"


def load_model_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike | None,
                     whose: str = "this model") -> None:
    """``model.load_state_dict(state)``; ValueError (the first line of torch's message) when it does not fit."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"checkpoint {path} does not fit {whose}: {first}") from err


def restore_training(
    ckpt: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    steps_per_epoch: int,
    path: str | os.PathLike | None,
) -> Progress:
    """Load the optimizer's and scheduler's states, check the RNG states and the place in the epoch against this
    run (ValueError, before anything is written), and return the run's :class:`Progress`. The RNG states
    themselves are set by the caller when training starts (:func:`set_rng_state`)."""
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
    except _LOAD_ERRORS as err:
        raise ValueError(f"checkpoint {path}: its optimizer state does not fit this run ({_short(err)})") from err
    for i, group in enumerate(optimizer.param_groups):
        missing = sorted(expected[i] - set(group)) if i < len(expected) else []
        if missing:
            raise ValueError(f"checkpoint {path}: optimizer group {i} has no {', '.join(missing)}")
        for key in ("lr", "momentum", "dampening", "weight_decay"):
            if key in group and not _is_number(group[key]):
                raise ValueError(f"checkpoint {path}: optimizer group {i} has {key}={group[key]!r}, not a number")
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None and not (isinstance(buf, torch.Tensor) and buf.shape == p.shape):
                raise ValueError(f"checkpoint {path}: a momentum buffer of the optimizer does not fit its parameter "
                                 f"({tuple(getattr(buf, 'shape', ()))} vs {tuple(p.shape)})")
    try:
        scheduler.load_state_dict(dict(ckpt["scheduler"]))  # a copy: LambdaLR pops from it
    except _LOAD_ERRORS as err:
        raise ValueError(f"checkpoint {path}: its scheduler state does not fit this run ({_short(err)})") from err
    if not (_is_int(scheduler.last_epoch) and scheduler.last_epoch >= 0
            and all(_is_number(x) for x in (*scheduler.base_lrs, *scheduler.get_last_lr()))
            and len(scheduler.base_lrs) == len(optimizer.param_groups)):
        raise ValueError(f"checkpoint {path}: its scheduler state is malformed")


def check_rng_state(state: Any, path: str | os.PathLike | None) -> None:
    """Try the checkpoint's RNG states (then put the current ones back): ValueError if they cannot be set."""
    current = rng_state()
    try:
        set_rng_state(state)
    except _LOAD_ERRORS as err:
        raise ValueError(f"checkpoint {path}: its RNG states are damaged ({_short(err)})") from err
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
SCHEDULE_NUMBERS = ("world_size", "global_batch", "steps_per_epoch", "warmup_steps", "total_steps")


def schedule_shape(world_size: int, parallel: str, global_batch: int, steps_per_epoch: int, warmup_steps: int,
                   total_steps: int) -> dict[str, Any]:
    """What a checkpoint records of the run's shape (``schedule``): its processes, how they split the work
    (``parallel``: "data", "modules", or "none" for one process), the images per optimizer step over all of them
    and the schedule's steps."""
    return {"world_size": world_size, "parallel": parallel, "global_batch": global_batch,
            "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup_steps, "total_steps": total_steps}


def saved_shape(ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
    """The shape of the run a checkpoint holds (:func:`schedule_shape`); for a checkpoint written before it was
    recorded, its steps per epoch alone when they can be told from its counters (an epoch completed); else None."""
    if "schedule" in ckpt:
        return dict(ckpt["schedule"])
    epoch, done = ckpt.get("epoch", 0), ckpt.get("step", 0) - ckpt.get("epoch_step", 0)
    if epoch > 0 and done > 0 and done % epoch == 0:
        return {"steps_per_epoch": done // epoch}
    return None


def describe_shape(shape: Mapping[str, Any]) -> str:
    """E.g. "2 processes (--parallel data), a global batch of 32 (4 steps per epoch)"."""
    steps = f"{shape['steps_per_epoch']} steps per epoch"
    if "world_size" not in shape:
        return steps
    ranks = shape["world_size"]
    parallel = "" if shape["parallel"] == "none" else f" (--parallel {shape['parallel']})"
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
    if saved.get("parallel") == "data" and saved["world_size"] > 1:
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


# ---------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, as tensors (python's and numpy's states converted), CUDA's when present."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(list(py_state), dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Set every RNG from :func:`rng_state`'s dict (CUDA's only where the device count matches); KeyError,
    TypeError, ValueError or RuntimeError for a damaged one (:func:`check_rng_state` turns them into one)."""
    torch.set_rng_state(state["torch"].cpu())
    gauss = float(state["python_gauss"][0])
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None if gauss != gauss else gauss))
    pos, has_gauss = (int(v) for v in state["numpy_pos"].tolist())
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, float(state["numpy_gauss"][0]))
    )
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# -------------------------------------------------------------------------------------------------- export
def data_root_of(ckpt: Mapping[str, Any]) -> str | None:
    """Where a run's data were actually read from (a Debian folder rather than the default ``data``, say),
    falling back to its configured data root for checkpoints that do not say."""
    source = ckpt.get("data_source")
    if source and Path(source).is_dir():
        return str(source)
    return configured_data_root(ckpt)


def configured_data_root(ckpt: Mapping[str, Any]) -> str | None:
    """The data root a run was configured with (its ``data_root`` option; None when it had none)."""
    return ckpt.get("config", {}).get("data_root")


def default_data_root(meta: Mapping[str, Any], dataset: str) -> str:
    """The data folder ``mlaan eval``/``export`` read ``dataset`` from when not given ``--data-root``, for a
    checkpoint or export described by ``meta`` (:func:`load_backbone`): for the run's own data set, where its files
    were found (``data_root``); for another, the data root the run was configured with (``configured_data_root``),
    never the folder the run's own data set was found in (Debian's Fashion-MNIST folder, say). ``data`` when the
    run had none."""
    if dataset == meta["dataset"]:
        return meta.get("data_root") or "data"
    if "configured_data_root" in meta:
        return meta["configured_data_root"] or "data"
    # an export written before configured_data_root: its data_root is the configured one unless the run's data set
    # locates its files elsewhere
    from ..data import available_datasets, dataset_spec

    located = meta["dataset"] in available_datasets() and dataset_spec(meta["dataset"]).locate is not None
    return (None if located else meta.get("data_root")) or "data"


def data_options_of(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The options of its own data set that a run read (``synthetic_train_size``, ...; none for most data sets),
    as its checkpoint's config saved them or, for one saved before the option existed, the default."""
    from ..data import data_option_keys

    config = merge(saved_config(ckpt))
    return {key: getattr(config, key) for key in data_option_keys(ckpt["dataset"])}


def local_model_from_checkpoint(ckpt: Mapping[str, Any], path: str | os.PathLike) -> Any:
    """The whole :class:`~mlaan.LocalModel` (backbone, aux nets, EMA twins) of a training checkpoint, built
    with the run's options and loaded with its weights. ValueError when the weights do not fit."""
    from .. import create_local_model

    config = merge(saved_config(ckpt))
    model = create_local_model(
        ckpt["arch"], method=ckpt["method"], num_local_modules=ckpt["local_modules"],
        num_classes=ckpt["num_classes"], in_channels=ckpt["in_channels"], image_size=ckpt["image_size"],
        **config.engine_options(tuple(ckpt["mean"]), tuple(ckpt["std"])),
    )
    load_model_state(model, ckpt["model"], path, whose="its own model")
    return model


def load_local_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """The whole :class:`~mlaan.LocalModel` of a ``mlaan train`` checkpoint (``last.pt`` / ``best.pt``, or a run
    folder for its ``last.pt``): backbone,
    aux nets and EMA twins, built with the run's options and holding its weights, on ``map_location``, in
    train mode. ValueError (one line) for a file that is not a training checkpoint (an export holds the backbone
    alone: load it with ``mlaan.models.create``) or whose weights do not fit."""
    path = _named_file(path)
    ckpt = load_training_checkpoint(path, map_location)
    return local_model_from_checkpoint(ckpt, path).to(map_location)


def backbone_state(ckpt: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The plain backbone's ``state_dict`` (keys ``blocks.<i>.…``) inside a training checkpoint's model state."""
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}


def load_backbone(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(backbone state_dict, description) from a training checkpoint, or from an export and the ``.json`` beside it
    (what ``mlaan eval`` evaluates). The description has ``arch``, ``num_classes``, ``in_channels``,
    ``image_size``, ``dataset``, ``data_root``, ``configured_data_root`` (missing in exports written before it)
    and ``data_options``, and for a training checkpoint the run's ``precise_bn``, ``batch_size``, ``seed`` and
    ``step`` (how its evaluation was made). FileNotFoundError / ValueError (one line, naming the file) when it is
    neither, or damaged. A run folder stands for its ``last.pt``."""
    path = _named_file(path)
    obj = load(path)
    if is_training_checkpoint(obj):
        check_training_checkpoint(obj, path)  # every field there and of the right kind
        return backbone_state(obj), describe_training_checkpoint(obj)
    meta_path = Path(path).with_suffix(".json")
    if not isinstance(obj, dict) or not meta_path.is_file():
        raise ValueError(f"{path} is neither a training checkpoint nor an export with {meta_path} beside it")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != "mlaan-backbone":
        raise ValueError(f"{meta_path} is not an mlaan export description")
    return obj, meta


def describe_training_checkpoint(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`load_backbone` says of a (checked) training checkpoint: how to build its backbone, its data set,
    and how its evaluation was made."""
    meta = {k: ckpt[k] for k in ("arch", "num_classes", "in_channels", "image_size", "dataset", "method",
                                 "local_modules", "step")}
    config = merge(saved_config(ckpt))
    meta.update(data_root=data_root_of(ckpt), configured_data_root=configured_data_root(ckpt),
                data_options=data_options_of(ckpt), precise_bn=config.precise_bn, batch_size=config.batch_size,
                seed=config.seed)
    return meta


def _check_export_target(out: Path, meta_path: Path) -> None:
    """An export replaces only an earlier export: never a training checkpoint, a run's ``metrics.json`` or any
    other file that happens to sit at ``out`` or ``out.json`` (ValueError naming it)."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name, e.g. {out / 'model.pt'}")
    if out == meta_path:
        raise ValueError(f"--out {out} ends in .json, the name of the description written beside the weights; "
                         "use e.g. .pt")
    earlier_export = False
    if meta_path.exists():
        try:
            earlier_export = json.loads(meta_path.read_text()).get("format") == "mlaan-backbone"
        except (OSError, ValueError, AttributeError):
            earlier_export = False
        if not earlier_export:
            raise ValueError(f"--out {out}: {meta_path} exists and is not an mlaan export description (a run's "
                             "results?); it is not replaced: choose another --out")
    if out.exists() and not earlier_export:
        raise ValueError(f"--out {out} exists and is not an earlier mlaan export (a training checkpoint?); it is "
                         "not replaced: choose another --out")


def holds_best(ckpt: Mapping[str, Any]) -> bool:
    """Whether a training checkpoint's weights are the ones whose evaluation reached the run's best accuracy:
    saved at the best evaluation's step. Checkpoints written before ``best_step`` was recorded: saved at the end
    of the best epoch."""
    if ckpt.get("best_step", -1) >= 0:
        return ckpt.get("step") == ckpt["best_step"]
    return ckpt.get("epoch") == ckpt.get("best_epoch") and not ckpt.get("epoch_step")


def export_backbone(ckpt: Mapping[str, Any], out: str | os.PathLike) -> tuple[Path, Path]:
    """Write the plain backbone's state_dict to ``out`` and its build recipe to ``out`` with ``.json``; returns
    both paths. ValueError when the checkpoint holds no backbone, or ``out`` or ``out.json`` is a file other than
    an earlier export (a training checkpoint, a run's metrics.json); FileNotFoundError when ``out``'s folder does
    not exist."""
    state = {k: v.detach().clone() for k, v in backbone_state(ckpt).items()}
    if not state:
        raise ValueError("checkpoint holds no backbone weights (no 'backbone.' keys in its model state)")
    load_with = (f"mlaan.models.create({ckpt['arch']!r}, num_classes={ckpt['num_classes']}, "
                 f"in_channels={ckpt['in_channels']}, image_size={ckpt['image_size']})")
    if ":" in ckpt["arch"]:  # torchvision:NAME / timm:NAME: the library class's own keys, loadable into it
        from .. import models

        with torch.device("meta"):
            backbone = models.create(ckpt["arch"], ckpt["num_classes"], ckpt["in_channels"], ckpt["image_size"])
        state = backbone.export_state_dict(state)
        load_with += ".source"
    out = Path(out)
    if out.parent and not out.parent.exists():
        raise FileNotFoundError(f"folder {out.parent} for --out does not exist")
    meta_path = out.with_suffix(".json")
    _check_export_target(out, meta_path)
    meta = {
        "format": "mlaan-backbone",
        "arch": ckpt["arch"],
        "num_classes": ckpt["num_classes"],
        "in_channels": ckpt["in_channels"],
        "image_size": ckpt["image_size"],
        "mean": list(ckpt["mean"]),
        "std": list(ckpt["std"]),
        "dataset": ckpt["dataset"],
        "data_root": data_root_of(ckpt),
        "configured_data_root": configured_data_root(ckpt),
        "data_options": data_options_of(ckpt),
        "trained_with": {"method": ckpt["method"], "local_modules": ckpt["local_modules"]},
        "epoch": ckpt.get("epoch"),  # epochs completed when these weights were saved
        "step": ckpt.get("step"),
        "best_accuracy": ckpt.get("best_accuracy"),  # the run's best test accuracy, reached at best_epoch
        "best_epoch": ckpt.get("best_epoch"),
        "is_best": holds_best(ckpt),
        "load_with": f"{load_with}.load_state_dict(torch.load({out.name!r}, weights_only=True))",
    }
    atomic_save(state, out)
    atomic_write_text(json.dumps(meta, indent=2) + "\n", meta_path)
    return out, meta_path
