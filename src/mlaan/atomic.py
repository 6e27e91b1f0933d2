"""Atomic file writes: a reader (or a run killed half-way) sees the old file or the new one, never half of one.

Every write goes to a temporary file beside its target (``.<name>.<random>.tmp``, same folder so that the rename
is atomic), is flushed and fsynced, then renamed over the target, and the folder is fsynced so that the rename
itself survives a crash. A process killed mid-write leaves only such a temporary file behind, which
:func:`stale_temp_files` finds. Torch is imported by :func:`atomic_save` alone, so the benchmarks and the CLI can
use this module without it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically. OSError (disk full, file too large, read-only folder) when the
    write fails; ``path`` is then the previous file, unchanged, and no temporary file is left."""
    import torch

    def write(f: IO[bytes]) -> None:
        recorder = _WriteRecorder(f)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            # torch's zip writer turns a failed write (disk full, file too large) into an obscure
            # RuntimeError: report the OSError underneath instead
            if recorder.error is not None:
                raise recorder.error from None
            raise
        if recorder.error is not None:  # a failed write that torch did not report: never rename it
            raise recorder.error

    atomic_write(path, "wb", write)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` atomically (metrics.json, export metadata); OSError as for :func:`atomic_save`."""
    atomic_write(path, "w", lambda f: f.write(text))


def atomic_write(path: str | os.PathLike, mode: str, write: Callable[[IO[Any]], Any]) -> None:
    """``write(file)`` into a temporary file beside ``path`` (opened with ``mode``), flush, fsync, rename over
    ``path``, fsync the folder. The temporary file is removed if anything fails (the exception propagates), so
    ``path`` stays the previous good file."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def stale_temp_files(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Temporary files that an atomic write of one of ``names`` into ``folder`` left behind when its process was
    killed (none when ``folder`` does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for name in names:
        found += sorted(folder.glob(f".{name}.*.tmp"))
    return found


class _WriteRecorder:
    """A file's ``write`` for ``torch.save`` that remembers the first OSError it raised."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.f.flush()


def _temp_beside(path: Path) -> tuple[int, str]:
    """A temporary file in ``path``'s folder (so ``os.replace`` is atomic), with the permissions a plain
    ``open`` would give (mkstemp makes it private)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a folder that cannot be opened (some file systems): the file itself was fsynced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
