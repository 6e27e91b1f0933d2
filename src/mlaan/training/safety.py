"""Keeping runs safe: stop signals, output-folder and data-root checks, resume-config checks, write failures.

What ``mlaan train`` promises (issue 5):

* **Signals.** The first SIGINT or SIGTERM only sets a flag (:class:`StopSignals`); the loop finishes the step in
  progress, saves ``last.pt`` and raises :class:`RunStopped`, whose message says how to resume; the command
  exits with ``128 + signal number``. A second signal acts at once (the previous handler is back), which is
  safe because every checkpoint is written atomically. DataLoader workers ignore both signals
  (:func:`ignore_stop_signals`), so that a Ctrl-C in a terminal does not kill them under the main process.
* **Write failures** (a full disk, a folder made read-only, a quota) while saving become
  :class:`OutputWriteError`, naming the file and the checkpoint that is still intact.
* **One run per folder.** A run owns its output folder through a lock file (:class:`RunFolderLock`, an OS
  lock taken with ``filelock``, so a killed run leaves no stale lock behind); a second run into the same folder is
  refused with :class:`RunFolderInUse` before it writes anything.
* **Bad input** found before anything is written: an output folder that cannot be written
  (:func:`check_output_dir`), a data root given explicitly that does not exist (:func:`check_data_root`),
  ``--resume`` with options that differ from the run's (:func:`check_resume_config`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .checkpoint import IDENTITY_KEYS

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

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
        "save_every",
        "grad_checkpointing",
        "amp",  # precision, memory format and threads change how fast a run goes, and float rounding only
        "channels_last",
        "threads",
        "extra",
    }
)


class RunStopped(Exception):
    """Training stopped on a signal after saving; ``code`` is the exit status (128 + the signal number)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.code = 128 + int(signum)


class RunFolderInUse(ValueError):
    """Another run holds the output folder's lock (a bad-input error: one line, exit 2)."""


class OutputWriteError(OSError):
    """A run's output could not be written (disk full, read-only folder, …); the message says what is kept."""

    def __str__(self) -> str:  # OSError's str would prefix "[Errno n]" to a message that already says it
        return str(self.args[0]) if self.args else ""


# ------------------------------------------------------------------------------------------------ signals
class StopSignals:
    """``with StopSignals() as stop: … if stop.received: …``: SIGINT/SIGTERM set ``received`` to the signal
    number instead of killing the process; a second signal gets the handler that was there before.

    Outside the main thread (where Python cannot install handlers) it does nothing and ``received`` stays None.
    """

    def __init__(self, signals: Iterable[int] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self.received = None
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum
        previous = self._previous.get(signum)
        if previous is not None:  # the next one of this signal acts at once
            signal.signal(signum, previous)

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    @staticmethod
    def name(signum: int) -> str:
        try:
            return signal.Signals(signum).name
        except ValueError:
            return f"signal {signum}"


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` for DataLoader workers: leave SIGINT/SIGTERM to the main process, which stops at a
    step boundary and shuts the workers down itself."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------- input checks
def check_output_dir(path: str | os.PathLike) -> None:
    """ValueError unless ``path`` is a writable folder or can be created as one. Leaves nothing behind: the
    probe is a temporary file in the nearest folder that exists, removed at once."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "exists and is not a folder" if probe == path else f"cannot be created: {probe} is not a folder"
        raise ValueError(f"output dir {path} {where}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".mlaan-write-test.", dir=probe)
    except OSError as err:
        what = f"{path}" if probe == path else f"{path} (its existing parent {probe})"
        raise ValueError(f"output dir {what} is not writable: {err.strerror or err}") from err
    os.close(fd)
    os.unlink(tmp)


class RunFolderLock:
    """Ownership of a run folder: an exclusive OS lock on ``<folder>/.mlaan.lock`` (``filelock``), held from before
    the run writes anything until it ends. The OS drops the lock when its process dies, so the lock of a killed run
    is no obstacle (only its file stays). Who holds it is written beside it, in ``.mlaan.lock.owner``, for the
    message that refuses a second run (the lock file itself is truncated by every attempt to take it)."""

    LOCK_NAME = ".mlaan.lock"
    OWNER_NAME = ".mlaan.lock.owner"

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.lock_path = self.folder / self.LOCK_NAME
        self.owner_path = self.folder / self.OWNER_NAME
        self._lock = None
        self._created: list[Path] = []  # folders this lock made, removed again by ``abandon``
        self._new_lock_file = False

    @property
    def held(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def acquire(self) -> None:
        """Take the lock at once or raise :class:`RunFolderInUse` naming the process that holds it."""
        from filelock import FileLock, Timeout

        if self.held:
            return
        missing = self.folder
        while not missing.exists() and missing != missing.parent:
            self._created.insert(0, missing)
            missing = missing.parent
        self.folder.mkdir(parents=True, exist_ok=True)
        self._new_lock_file = not self.lock_path.exists()
        lock = FileLock(str(self.lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise RunFolderInUse(
                f"output dir {self.folder} is in use by another run ({self._owner_text()}); wait for it to "
                "finish, stop it, or choose another --output-dir"
            ) from None
        self._lock = lock
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.owner_path.write_text(json.dumps(owner) + "\n")

    def _owner_text(self) -> str:
        try:
            owner = json.loads(self.owner_path.read_text())
            return f"process {owner['pid']} on {owner['host']}, since {owner['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not said who it is yet"

    def release(self) -> None:
        """Give the folder up (the lock file stays, so that a later run locks the same file)."""
        if not self.held:
            return
        self.owner_path.unlink(missing_ok=True)
        self._lock.release(force=True)
        self._lock = None

    def abandon(self) -> None:
        """Release after a refused start: also remove what taking the lock created, so that bad input leaves the
        folder as it was."""
        was_held = self.held
        self.release()
        if was_held and self._new_lock_file:
            self.lock_path.unlink(missing_ok=True)
        for folder in reversed(self._created):
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break
        self._created = []


def check_data_root(dataset: str, data_root: str | None, download: bool) -> None:
    """A data root given explicitly must exist (unless ``--download`` is to create it): no silent fallback to
    another copy of the data."""
    from ..data import dataset_spec

    if dataset_spec(dataset).root == "unused" or data_root is None or download:
        return
    root = Path(data_root)
    if not root.exists():
        raise FileNotFoundError(f"data root {data_root} does not exist (--data-root; add --download to fetch "
                                f"{dataset} there)")
    if not root.is_dir():
        raise NotADirectoryError(f"data root {data_root} is not a folder (--data-root)")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def check_resume_config(saved: Mapping[str, Any], given: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuse to resume with options (from flags or ``--config``) that change what the run computes.

    ``saved``: the checkpoint's config; ``given``: the values set explicitly for this invocation (already
    converted). Options in :data:`RESUME_FREE` may change; arch/method/K are checked elsewhere.
    """
    from .config import coerce

    conflicts = []
    for name, value in sorted(given.items()):
        if name in RESUME_FREE or name in IDENTITY_KEYS or name not in saved:
            continue
        try:
            before = coerce(name, saved[name])
        except ValueError:
            continue
        if not _same(before, value):
            conflicts.append(f"{name}: {_show(before)} in the run, {_show(value)} given")
    if conflicts:
        raise ValueError(
            f"--resume: the options differ from those of the run in {Path(path).parent} "
            f"({'; '.join(conflicts)}); resume with the run's options, or start a new run in another --output-dir"
        )


def _show(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value, default=str)


# ------------------------------------------------------------------------------------------ output files
def stale_temp_files(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Temporary files that an atomic write of one of ``names`` left behind when the process was killed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for name in names:
        found += sorted(folder.glob(f".{name}.*.tmp"))
    return found


def read_metrics_lines(path: str | os.PathLike, up_to_step: int) -> list[str]:
    """The lines of ``metrics.jsonl`` logged at or before ``up_to_step``; a line cut short by a crash or a
    full disk (not valid JSON) is dropped."""
    kept = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= up_to_step:
            kept.append(line)
    return kept


# ------------------------------------------------------------------------------------- checkpoint schema
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _tensor_dict(v: Any) -> bool:
    import torch

    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


def _rng_states(v: Any) -> bool:
    import torch

    def ok(x: Any) -> bool:
        return isinstance(x, torch.Tensor) or (isinstance(x, (list, tuple)) and all(ok(y) for y in x))

    return isinstance(v, dict) and all(isinstance(k, str) and ok(x) for k, x in v.items())


_CHECKPOINT_FIELDS: dict[str, tuple[str, Any]] = {
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
_OPTIONAL_FIELDS: dict[str, tuple[str, Any]] = {
    "rng": ("a mapping of RNG states", _rng_states),
    "epoch_partial": ("a mapping of numbers (and per-module lists of numbers)", lambda v: _epoch_partial(v)),
    "wall_time": ("a number", _is_number),
    "data_source": ("a path", lambda v: isinstance(v, str)),
    "version": ("an integer", _is_int),
}


def _epoch_partial(value: Any) -> bool:
    """The sums of an epoch in progress: numbers, and ``module_loss_sums``: {kind: [number or None, ...]}."""
    if not isinstance(value, dict):
        return False
    modules = value.get("module_loss_sums", {})
    lists_ok = isinstance(modules, dict) and all(
        isinstance(v, list) and all(x is None or _is_number(x) for x in v) for v in modules.values()
    )
    return lists_ok and all(_is_number(x) for k, x in value.items() if k != "module_loss_sums")


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
                shown = type(ckpt[key]).__name__
                raise ValueError(f"checkpoint {path}: field {key!r} should be {kind}, got a {shown}")


# ------------------------------------------------------------------------------------ restoring a checkpoint
_LOAD_ERRORS = (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError, OverflowError)


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"


def load_optimizer_and_scheduler(optimizer: Any, scheduler: Any, ckpt: Mapping[str, Any],
                                 path: str | os.PathLike | None) -> None:
    """``load_state_dict`` both, then check what they hold, so that a checkpoint whose states do not fit this
    run is refused here (ValueError) rather than failing with a traceback in the middle of training."""
    import torch

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
    from . import checkpoint as ckpt_io

    current = ckpt_io.rng_state()
    try:
        ckpt_io.set_rng_state(state)
    except _LOAD_ERRORS as err:
        raise ValueError(f"checkpoint {path}: its RNG states are damaged ({_short(err)})") from err
    finally:
        ckpt_io.set_rng_state(current)


def check_position(ckpt: Mapping[str, Any], steps_per_epoch: int, path: str | os.PathLike | None) -> None:
    """The saved place in the epoch must exist in this run's epochs."""
    if ckpt["epoch_step"] > steps_per_epoch:
        raise ValueError(
            f"checkpoint {path} stopped after step {ckpt['epoch_step']} of an epoch, but an epoch of this run has "
            f"{steps_per_epoch} steps: the data or the batch size differ from the run's"
        )
