"""The training checkpoint's file: its schema, writing it (the saver), reading and checking it, the model's and
RNG states. Only tensors and plain data, written atomically (:mod:`mlaan.atomic`),
read with ``weights_only=True``. What a resume may change and how a run is restored from a checkpoint is
:mod:`mlaan.training.resume`; exporting the backbone and loading a trained model, :mod:`mlaan.training.export`.

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
writes ``shards/manifest.json`` (ranks, partition, step, each shard's SHA-256) as the mark of a complete save
(:mod:`mlaan.training.parallel`).
So such a run resumes in one process, or with another number of ranks, like any other.

Every check raises ValueError (FileNotFoundError for a missing file) with a one-line message naming the file,
which ``mlaan`` reports with exit code 2 before anything is written.
"""

from __future__ import annotations

import math
import os
import random
import re
import shlex
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..atomic import atomic_save
from .config import FIELD_NAMES, TrainConfig
from .safety import OutputWriteError

if TYPE_CHECKING:
    from ..data import DatasetInfo

FORMAT = "mlaan-checkpoint"
VERSION = 1
# the run's shape (schedule_shape in mlaan.training.resume): its numbers, checked by the schema
SCHEDULE_NUMBERS = ("world_size", "global_batch", "steps_per_epoch", "warmup_steps", "total_steps")


# ------------------------------------------------------------------------------------------------- reading
def is_empty_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` is empty or blank (an unset shell variable, say): ``Path("")`` is the current folder, which
    is never taken for the path meant. Every command and loader refuses such a path in its own words."""
    return not str(path).strip()


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file ``path`` names: a run folder holding ``last.pt`` stands for that file, as a user who
    names a run means its latest state; any other path is returned as it is (a folder without ``last.pt`` is then
    refused by :func:`load`, which lists the checkpoints in it). FileNotFoundError for an empty path
    (:func:`is_empty_path`)."""
    if is_empty_path(path):
        raise FileNotFoundError("the checkpoint path is empty: give a checkpoint file (last.pt, best.pt) or a run "
                                "folder")
    path = Path(path)
    return path / "last.pt" if path.is_dir() and (path / "last.pt").is_file() else path


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of any checkpoint or export, after checking its zip archive's CRCs; a run
    folder stands for its ``last.pt`` (:func:`checkpoint_file`).

    FileNotFoundError when ``path`` is not a file (IsADirectoryError: a folder without ``last.pt``); ValueError
    (naming the path) when it is damaged, not a checkpoint, or holds a pickled callable or class (refused, never
    called)."""
    path = checkpoint_file(path)
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
    path = checkpoint_file(path)
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


def saved_config(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The run's options as the checkpoint saved them, less any key this version of mlaan does not know."""
    return {k: v for k, v in ckpt.get("config", {}).items() if k in FIELD_NAMES}


# -------------------------------------------------------------------------------------------------- schema
def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _tensor_dict(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


def _rng_states(v: Any) -> bool:
    def ok(x: Any) -> bool:
        return isinstance(x, torch.Tensor) or (isinstance(x, (list, tuple)) and all(ok(y) for y in x))

    return isinstance(v, dict) and all(isinstance(k, str) and ok(x) for k, x in v.items())


def _schedule(value: Any) -> bool:
    return (isinstance(value, dict) and all(is_int(value.get(k)) and value[k] >= 0 for k in SCHEDULE_NUMBERS)
            and isinstance(value.get("parallel"), str))


def _epoch_partial(value: Any) -> bool:
    """The sums of an epoch in progress: numbers, and ``module_loss_sums``: {kind: [number or None, ...]}."""
    if not isinstance(value, dict):
        return False
    modules = value.get("module_loss_sums", {})
    lists_ok = isinstance(modules, dict) and all(
        isinstance(v, list) and all(x is None or is_number(x) for x in v) for v in modules.values()
    )
    return lists_ok and all(is_number(x) for k, x in value.items() if k != "module_loss_sums")


_CHECKPOINT_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "arch": ("a name", lambda v: isinstance(v, str)),
    "method": ("a name", lambda v: isinstance(v, str)),
    "dataset": ("a name", lambda v: isinstance(v, str)),
    "local_modules": ("a positive integer", lambda v: is_int(v) and v >= 1),
    "num_classes": ("a positive integer", lambda v: is_int(v) and v >= 1),
    "in_channels": ("a positive integer", lambda v: is_int(v) and v >= 1),
    "image_size": ("a positive integer", lambda v: is_int(v) and v >= 1),
    "mean": ("a list of numbers", lambda v: isinstance(v, (list, tuple)) and v and all(map(is_number, v))),
    "std": ("a list of numbers", lambda v: isinstance(v, (list, tuple)) and v and all(map(is_number, v))),
    "model": ("a state_dict of tensors", _tensor_dict),
    "optimizer": ("an optimizer state_dict",
                  lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                  and isinstance(v.get("param_groups"), list) and all(isinstance(g, dict) for g in v["param_groups"])),
    "scheduler": ("a scheduler state_dict", lambda v: isinstance(v, dict)),
    "epoch": ("an integer >= 0", lambda v: is_int(v) and v >= 0),
    "epoch_step": ("an integer >= 0", lambda v: is_int(v) and v >= 0),
    "step": ("an integer >= 0", lambda v: is_int(v) and v >= 0),
    "best_accuracy": ("a number", is_number),
    "best_epoch": ("an integer >= 0", lambda v: is_int(v) and v >= 0),
    "config": ("a mapping of options", lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v)),
}
_OPTIONAL_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "rng": ("a mapping of RNG states", _rng_states),
    "epoch_partial": ("a mapping of numbers (and per-module lists of numbers)", _epoch_partial),
    "wall_time": ("a number", is_number),
    "data_source": ("a path", lambda v: isinstance(v, str)),
    "version": ("an integer", is_int),
    "best_step": ("an integer >= -1", lambda v: is_int(v) and v >= -1),  # absent from checkpoints before it
    # absent from checkpoints before them: a run resumed from one reports the peak of its later invocations only
    "peak_memory_bytes": ("an integer >= 0", lambda v: is_int(v) and v >= 0),
    "peak_memory_kind": ("a name", lambda v: isinstance(v, str)),
    # absent from checkpoints before them (see resume.py: check_schedule, saved_barriers, shard_streams)
    "schedule": ("a mapping of the run's shape (integers and the parallel mode)", lambda v: _schedule(v)),
    "cascade_barriers": ("a list of module indices", lambda v: isinstance(v, list) and all(is_int(b) and b >= 0
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
    module-parallel run's (:func:`~mlaan.training.parallel.merge_shards`): its ``model``, ``optimizer`` and
    ``pipeline`` replace this process's; ``schedule``: the run's shape
    (:func:`~mlaan.training.resume.schedule_shape`); ``rng_ranks``: every rank's RNG states (data parallelism).
    Takes the RNG states now, so nothing may draw a random number between this call and the step it describes."""
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


# the folder of a module-parallel run's shards (written and merged by mlaan.training.parallel)
SHARDS = "shards"


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
LOAD_ERRORS = (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError, OverflowError)


def short_error(err: BaseException) -> str:
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
    TypeError, ValueError or RuntimeError for a damaged one (:func:`~mlaan.training.resume.check_rng_state` turns
    them into one)."""
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
