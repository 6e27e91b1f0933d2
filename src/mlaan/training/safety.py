"""Keeping runs safe: stop signals, one run per output folder, output-folder and data-root checks.

What ``mlaan train`` promises (issue 5):

* **Signals.** The first SIGINT or SIGTERM only sets a flag (:class:`StopSignals`); the loop finishes the step in
  progress, saves ``last.pt`` and raises :class:`RunStopped`, whose message says how to resume; the command
  exits with ``128 + signal number``. A second signal acts at once (the previous handler's action), which is
  safe because every checkpoint is written atomically (:mod:`mlaan.atomic`); a repeat within a second is the
  same request delivered twice (directly and by a harness passing it on) and only the first counts. DataLoader
  workers ignore both signals (:func:`ignore_stop_signals`), so that a Ctrl-C in a terminal does not kill them
  under the main process.
* **Write failures** (a full disk, a folder made read-only, a quota) while saving become
  :class:`OutputWriteError`, naming the file and the checkpoint that is still intact
  (:class:`mlaan.training.checkpoint.CheckpointSaver`).
* **One run per folder.** A run owns its output folder through a lock file (:class:`RunFolderLock`, an OS
  lock taken with ``filelock``, so a killed run leaves no stale lock behind); a second run into the same folder is
  refused with :class:`RunFolderInUse` before it writes anything.
* **Bad input** found before anything is written: an output folder that cannot be written
  (:func:`check_output_dir`), a data root given explicitly that does not exist (:func:`check_data_root`).
  ``--resume`` with options that differ from the run's is refused by
  :func:`mlaan.training.resume.check_resume_config`.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

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

    A repeat within :attr:`REPEAT_WINDOW_S` seconds of the first is the same request delivered twice, not a
    second one: ``pkill``, a job scheduler (SLURM signals every process of a job) or a terminal's process group
    reach a run directly *and* through the harness that started it (``mlaan bench accuracy``, ``torchrun``),
    which passes the signal on; acting at once on that echo would stop the run without its checkpoint.

    Outside the main thread (where Python cannot install handlers) it does nothing and ``received`` stays None.
    """

    REPEAT_WINDOW_S = 1.0

    def __init__(self, signals: Iterable[int] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: int | None = None
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self.received = None
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received, self._received_at = signum, time.monotonic()
        elif time.monotonic() - self._received_at >= self.REPEAT_WINDOW_S:
            self._act_at_once(signum, frame)

    def _act_at_once(self, signum: int, frame: object) -> None:
        """What the signal would have done without us: the previous handler, or the default action."""
        previous = self._previous.get(signum)
        if previous is None:  # installed outside Python: the default stands in for it
            previous = signal.SIG_DFL
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

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


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def signal_when_parent_dies(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child is sent ``signum`` when this process dies, even by
    SIGKILL or the OOM killer (Linux ``prctl(PR_SET_PDEATHSIG)``), so that a training run saves its checkpoint
    and exits instead of training on, orphaned, and a helper process does not spin forever. None (Popen's
    default: nothing) where the OS has no such call.

    Linux sends the signal when the *thread* that started the child exits: start children from the main thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:  # in the child, between fork and exec
        prctl(PR_SET_PDEATHSIG, int(signum))
        if os.getppid() != parent:  # the parent died before the call: no one is left to send the signal
            os._exit(128 + int(signum))

    return arm


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

    def try_acquire(self) -> str | None:
        """Take the lock at once and return None, or return who holds it ("process 123 on host, since …")."""
        try:
            self.acquire()
        except RunFolderInUse:
            return self._owner_text()
        return None

    @classmethod
    def holder(cls, folder: str | os.PathLike) -> str | None:
        """Who holds ``folder``'s lock, or None if nobody does. The probe takes the lock for a moment and gives
        it back (a lock file that is not there means no holder, and is not created)."""
        probe = cls(folder)
        if not probe.lock_path.exists():
            return None
        who = probe.try_acquire()
        probe.release()
        return who

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


class HarnessClaim(RunFolderLock):
    """A harness's claim on a run folder for as long as its ``mlaan train`` child runs (``mlaan bench accuracy``):
    another harness on the same folder finds it held and leaves that run alone. Its own lock file, beside the
    run's: the child takes the run's lock only once it has started up, seconds later."""

    LOCK_NAME = ".mlaan.claim"
    OWNER_NAME = ".mlaan.claim.owner"


def check_data_root(dataset: str, data_root: str | None, download: bool) -> None:
    """A data root given explicitly must exist (unless ``--download`` is to create it): no silent fallback to
    another copy of the data. FileNotFoundError when it does not exist, NotADirectoryError when it is a file."""
    from ..data import dataset_spec

    spec = dataset_spec(dataset)
    if spec.root == "unused" or data_root is None or download:
        return
    root = Path(data_root)
    if not root.exists():
        fix = f"add --download to fetch {dataset} there" if spec.downloadable else (spec.obtain or spec.root_hint)
        raise FileNotFoundError(f"data root {data_root} does not exist (--data-root; {fix})")
    if not root.is_dir():
        raise NotADirectoryError(f"data root {data_root} is not a folder (--data-root)")


def check_tensorboard(wanted: bool) -> None:
    """ValueError (one line) when ``--tensorboard`` is asked for without the tensorboard package."""
    if not wanted:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:
        raise ValueError(f"--tensorboard needs the tensorboard package ({err}): pip install tensorboard") from err


def check_batch_of_one(cfg: Any, train_images: int, local_model: Any, image_size: int, distributed: bool) -> None:
    """Refuse up front a run whose batches can hold one image while a BatchNorm layer sees a 1×1 map: it would
    crash in that layer at its first step (a whole data set smaller than the batch is one batch). ``train_images``:
    the images this process's sampler reads an epoch; ValueError, one line, naming the layer and the fix."""
    smallest = min(cfg.batch_size, train_images)
    if smallest > 1 or (cfg.sync_bn and distributed):  # SyncBatchNorm sees every rank's image
        return
    layers = local_model.single_value_batchnorms()
    if layers:
        why = "--batch-size 1" if cfg.batch_size == 1 else f"a training set of {train_images} image"
        raise ValueError(
            f"{why} cannot train {cfg.arch} on {image_size}x{image_size} images: BatchNorm layer {layers[0]} sees "
            "a 1x1 map, i.e. one value per channel in a batch of one; use --batch-size 2 or more"
        )
