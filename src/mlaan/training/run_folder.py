"""A run's output folder (``--output-dir``): who may write there, what is in it, and what a resume takes from it.

:class:`RunFolder` checks, while the run is built, that the folder holds no other run (unless ``--overwrite``, or
resuming in the checkpoint's own folder); takes the folder's lock before the first write and checks again under it
(:class:`~mlaan.training.safety.RunFolderLock`); prepares it (stale temporary files, the replaced run's files, the
log lines of a resumed run) and carries a run resumed into another folder over to it; and tells a resume with
nothing left to train from one that must still evaluate. :func:`resume_path` resolves what ``--resume`` names.

The files a run writes are :data:`RUN_FILES`; errors are one-line ValueError/RunFolderInUse messages naming the
folder, raised before anything in it is touched.
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..atomic import atomic_write, atomic_write_text, stale_temp_files
from . import checkpoint as ckpt_io
from . import metrics_log, safety
from .config import merge

RUN_FILES = ("metrics.jsonl", "metrics.json", "last.pt", "best.pt")
AUTO_RESUME = "auto"  # --resume alone: <output-dir>/last.pt

Reduce = Callable[[dict[str, float]], dict[str, float]]  # sums of counts over every rank


class RunFolder:
    """The output folder ``out`` of one run, resumed from ``resume_path`` (None: a new run). ``overwrite``: the
    run may replace another run's files (``--overwrite``); ``is_main``: this process writes (rank 0)."""

    def __init__(self, out: str | os.PathLike, resume_path: str | os.PathLike | None, overwrite: bool,
                 is_main: bool = True) -> None:
        self.out = Path(out)
        self.resume_path = resume_path
        self.overwrite = overwrite
        self.is_main = is_main
        self.replaced: list[str] = []  # --overwrite: the old run's files, removed when the new run first writes
        self._lock = safety.RunFolderLock(self.out)  # held while the run trains

    @property
    def resuming_in_place(self) -> bool:
        """Resuming in the checkpoint's own folder (its files are this run's), rather than into another."""
        return self.resume_path is not None and Path(self.resume_path).parent.resolve() == self.out.resolve()

    def check(self) -> None:
        """Nothing in the output folder is touched unless resuming or told to overwrite (checked again by
        :meth:`claim`, under the folder's lock, in case another run got there in between)."""
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"output dir {self.out} exists and is not a folder")
        self.check_no_other_run()
        safety.check_output_dir(self.out)

    def check_no_other_run(self) -> None:
        """Refuse a folder holding a run this invocation does not continue, unless ``--overwrite``: any run for a
        fresh start; for a resume, any but the checkpoint's own (their files would be replaced by, or left mixed
        with, the resumed run's)."""
        existing = [name for name in RUN_FILES if (self.out / name).exists()]
        if not existing or self.overwrite or self.resuming_in_place:
            return
        if self.resume_path is None:
            raise safety.RunFolderInUse(
                f"output dir {self.out} already holds a run ({', '.join(existing)}); "
                "pass --resume to continue it, --overwrite to replace it, or another --output-dir"
            )
        # The folder may hold another run or an earlier copy of this one (a chain A -> B resumed back into A):
        # either way its files would be replaced, so the message does not guess which.
        raise safety.RunFolderInUse(
            f"output dir {self.out} already holds run files ({', '.join(existing)}) and is not the folder of the "
            f"checkpoint resumed from, {self.resume_path}; resume into that folder ({Path(self.resume_path).parent}) "
            "or an empty --output-dir, or pass --overwrite to replace what is there"
        )

    def claim(self, reduce: Reduce) -> None:
        """Take the output folder's lock before anything is written (rank 0; every rank learns whether it got
        it, through ``reduce``), and check under it that no other run has been written there since the build. On
        refusal (:class:`~mlaan.training.safety.RunFolderInUse`) the folder is left as it was."""
        refused: Exception | None = None
        if self.is_main:
            try:
                self._lock.acquire()
                self.check_no_other_run()
            except (ValueError, OSError) as err:
                self._lock.abandon()
                refused = err
        if reduce({"refused_count": float(refused is not None)})["refused_count"] > 0:
            raise refused if refused is not None else safety.RunFolderInUse(
                f"output dir {self.out} is not free: rank 0 could not take it (see its message)")

    def release(self) -> None:
        """Give the folder's lock up (after the run's last write; nothing when it was not taken)."""
        self._lock.release()

    def prepare(self, progress: ckpt_io.Progress) -> None:
        """Make the folder ready for the run's first write (rank 0, after :meth:`claim`): remove temporary files
        left by a killed save; resuming in place, drop the log lines written after the checkpoint (at
        ``progress``); resuming into another folder, carry the run over (:meth:`carry_over`)."""
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in stale_temp_files(self.out, RUN_FILES):  # left by a run killed while saving
            stale.unlink(missing_ok=True)
        if self.resuming_in_place:  # keep the log lines up to the checkpoint, drop any written after it
            metrics_log.keep_lines_up_to(self.out / "metrics.jsonl", progress.step)
            (self.out / "metrics.json").unlink(missing_ok=True)
            return
        # validated: a folder without a run, or --overwrite
        shutil.rmtree(self.out / ckpt_io.SHARDS, ignore_errors=True)  # a replaced module-parallel run's
        if self.resume_path is None:
            # a fresh run: the replaced run's files stay until this one writes its first (clear_replaced_run),
            # so that a run failing before that (a non-finite loss at step 3) does not leave an empty folder
            self.replaced = [name for name in RUN_FILES if (self.out / name).exists()]
            return
        for name in RUN_FILES:
            (self.out / name).unlink(missing_ok=True)
        self.carry_over(progress)

    def carry_over(self, progress: ckpt_io.Progress) -> None:
        """Resuming into another folder moves the run there, as a user who names a new folder expects: it gets the
        checkpoint as last.pt, the run's best.pt up to it and its log lines up to it, so that it holds the whole
        run at once. (Otherwise a finished run, with nothing left to train, would leave a metrics.json alone;
        and a run would have no last.pt to resume from until its next save, nor a best.pt until it improves.)"""
        source = Path(self.resume_path)
        carry_checkpoints(source, progress, self.out)
        log = source.parent / "metrics.jsonl"
        if log.is_file():
            lines = metrics_log.read_metrics_lines(log, progress.step)
            atomic_write_text("".join(line + "\n" for line in lines), self.out / "metrics.jsonl")

    def clear_replaced_run(self, saver: ckpt_io.CheckpointSaver) -> None:
        """Remove what is left of the run that ``--overwrite`` replaces, just before this run's first write
        (through ``saver``, whose failed writes say which checkpoint is intact)."""
        if not (self.replaced and self.is_main):
            return
        names, self.replaced = self.replaced, []

        def remove() -> None:
            for name in names:
                (self.out / name).unlink(missing_ok=True)

        saver.guard(remove, self.out)

    def finished_run(self, steps_left: bool, why: Callable[[], str], reduce: Reduce,
                     log: Callable[[str], None]) -> dict[str, Any] | None:
        """A resume in the run's own folder with no step left to train (``steps_left`` False) and the run's
        metrics.json there: say so in one line (``why()``: why nothing is left) and return that metrics.json,
        leaving every file as it was (evaluating again would replace the run's figures with those of an
        evaluation-only process; ``mlaan eval`` evaluates a checkpoint). None otherwise: a run that stopped after
        its last save but before writing metrics.json, or one resumed into another folder, is evaluated and gets
        its metrics.json. Rank 0 decides for every rank (``reduce``)."""
        if steps_left or not self.resuming_in_place:
            return None
        summary = metrics_log.read_summary(self.out / "metrics.json") if self.is_main else None
        if reduce({"finished_count": float(summary is not None)})["finished_count"] == 0:
            return None
        log(f"mlaan train: {self.resume_path} is {why()}: nothing to train; {self.out} is left as it was (evaluate "
            f"with: mlaan eval --checkpoint {shlex.quote(str(self.resume_path))})")
        return summary or {}


def carry_checkpoints(source: str | os.PathLike, progress: ckpt_io.Progress, folder: str | os.PathLike) -> list[str]:
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


def _is_best_up_to(path: Path, progress: ckpt_io.Progress) -> bool:
    """Whether ``path`` is the best checkpoint of the run at ``progress``: saved at or before that step and with the
    same best accuracy (a best.pt saved after the resumed checkpoint, or damaged, is not carried over)."""
    try:
        best = ckpt_io.load_training_checkpoint(path)
    except (OSError, ValueError):
        return False
    return best["step"] <= progress.step and best["best_accuracy"] == progress.best_accuracy


def _copy_atomically(source: Path, target: Path) -> None:
    with open(source, "rb") as src:
        atomic_write(target, "wb", lambda f: shutil.copyfileobj(src, f))


def named_folder(file_values: Mapping[str, Any], overrides: Mapping[str, Any]) -> Path:
    """The output folder this invocation names: ``output_dir`` when given, else the default one its options
    resolve to. Given, it is taken as is, since the rest of the options (``-K`` restated for the run's own
    architecture, say) can only be checked against the checkpoint in it."""
    given = {**file_values, **overrides}.get("output_dir")
    if given is not None and not ckpt_io.is_empty_path(given):
        return Path(given)
    return Path(merge(file_values, overrides).resolve().output_dir)


def resume_path(resume: str | os.PathLike, file_values: Mapping[str, Any], overrides: Mapping[str, Any]) -> Path:
    """The checkpoint ``--resume`` names (:func:`~mlaan.training.checkpoint.checkpoint_file`: a run folder is its
    ``last.pt``). For ``"auto"``, ``last.pt`` in the folder this invocation's options name
    (:func:`named_folder`): they are resolved on their own for that, since the checkpoint's options are not known
    before it is read. ValueError for an empty path; FileNotFoundError when there is nothing to resume;
    RunFolderInUse when the checkpoint is not there yet because another process is training in its folder."""
    if ckpt_io.is_empty_path(resume):
        raise ValueError("--resume '' is empty: give a checkpoint file, or --resume alone for <output-dir>/last.pt")
    auto = str(resume) == AUTO_RESUME
    path = named_folder(file_values, overrides) / "last.pt" if auto else ckpt_io.checkpoint_file(resume)
    if not path.is_file():
        # a run folder without last.pt yet, or a file's folder
        folder, missing = (path, path / "last.pt") if path.is_dir() else (path.parent, path)
        holder = safety.RunFolderLock.holder(folder) if folder.is_dir() else None
        if holder is not None:
            raise safety.RunFolderInUse(
                f"--resume: {missing} does not exist yet: {folder} is in use by another run ({holder}); wait "
                "for it to save or finish, or stop it, then resume"
            )
        if auto:
            raise FileNotFoundError(f"--resume: nothing to resume, {path} does not exist")
    return path
