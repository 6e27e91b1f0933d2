"""``metrics.jsonl``: one JSON line per epoch, appended durably; a resumed run keeps the lines up to its checkpoint.
``metrics.json``, written at a run's end, is read back by :func:`read_summary`.

What a *finished* run is, once for every reader (``mlaan bench accuracy``, ``mlaan report``, a resume): one that
trained its whole schedule, every epoch of ``--epochs`` (:func:`schedule_finished`). A run that ended on
``--max-steps`` before that wrote a ``metrics.json`` too, but is *stopped*, not finished (:func:`run_state`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text


def log_epoch(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Add an epoch's line to ``metrics.jsonl``; a line of the same epoch cut short by ``--max-steps`` is replaced,
    since the resumed epoch's record covers all of its steps (one line per epoch). OSError when it cannot be
    written."""
    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else []
    if lines:
        try:
            last = json.loads(lines[-1])
        except ValueError:
            last = None
        if isinstance(last, dict) and last.get("epoch") == record["epoch"] and last.get("complete") is False:
            text = "".join(line + "\n" for line in [*lines[:-1], json.dumps(record)])
            atomic_write_text(text, path)
            return
    _append_line(path, json.dumps(record))


def keep_lines_up_to(path: str | os.PathLike, step: int) -> None:
    """Resuming from the checkpoint of ``step``: drop the lines logged after it (and a line cut short by a crash or a
    full disk), rewriting ``metrics.jsonl`` atomically. Nothing to do when the file does not exist."""
    path = Path(path)
    if path.exists():
        kept = read_metrics_lines(path, step)
        atomic_write_text("".join(line + "\n" for line in kept), path)


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


def read_summary(path: str | os.PathLike) -> dict[str, Any] | None:
    """A run's ``metrics.json`` (written at its end), or None when there is none, it cannot be read as a JSON
    object, or it lacks the figures every finished run writes (``test_accuracy``, ``steps``)."""
    try:
        summary = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and {"test_accuracy", "steps"} <= summary.keys() else None


FINISHED, STOPPED, UNFINISHED, NEW = "finished", "stopped", "unfinished", "new"


def schedule_finished(epochs_completed: int, epochs: int) -> bool:
    """Whether a run that has completed ``epochs_completed`` epochs of its ``--epochs`` schedule is finished: the
    one definition (a run stopped by ``--max-steps`` inside or before its last epoch is not)."""
    return epochs_completed >= epochs


def stopped_early(summary: dict[str, Any]) -> tuple[int | None, int | None] | None:
    """``(steps trained, steps of the whole schedule)`` when the run whose ``metrics.json`` is ``summary`` ended
    before its schedule's end (``--max-steps``); None when it finished it, or when the summary does not say (none
    written by `mlaan train` lacks ``epochs_completed`` and the config's ``epochs``)."""
    config = summary.get("config") if isinstance(summary.get("config"), dict) else {}
    epochs, done = config.get("epochs"), summary.get("epochs_completed")
    if not _count(epochs) or not _count(done) or schedule_finished(done, epochs):
        return None
    steps, per_epoch = summary.get("steps"), summary.get("steps_per_epoch")
    planned = per_epoch * epochs if _count(per_epoch) else None
    return (steps if _count(steps) else None), planned


def summary_finished(summary: dict[str, Any]) -> bool:
    """Whether ``metrics.json`` (``summary``) is a finished run's: see :func:`schedule_finished`."""
    return stopped_early(summary) is None


def run_state(folder: str | os.PathLike) -> str:
    """A run folder's state: ``"finished"`` (a ``metrics.json`` of the whole schedule), ``"stopped"`` (a
    ``metrics.json`` of a run that ended before it: ``--max-steps``; resumed, it trains on), ``"unfinished"`` (a
    ``last.pt`` without ``metrics.json``: interrupted, killed, or one that cannot be read back, which a resume
    rewrites) or ``"new"`` (neither)."""
    folder = Path(folder)
    has_checkpoint = (folder / "last.pt").exists()
    final = folder / "metrics.json"
    if not final.exists():
        return UNFINISHED if has_checkpoint else NEW
    try:
        summary = json.loads(final.read_text())
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict):
        return UNFINISHED if has_checkpoint else FINISHED  # nothing to resume: the report says what is wrong
    return FINISHED if summary_finished(summary) else STOPPED


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _append_line(path: Path, line: str) -> None:
    # fsynced before the epoch's checkpoint is written, so that no checkpoint outlives the line of its epoch
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
