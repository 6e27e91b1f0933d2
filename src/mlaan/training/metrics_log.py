"""``metrics.jsonl``: one JSON line per epoch, appended durably; a resumed run keeps the lines up to its checkpoint.
``metrics.json``, written at a run's end, is read back by :func:`read_summary`."""

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


def _append_line(path: Path, line: str) -> None:
    # fsynced before the epoch's checkpoint is written, so that no checkpoint outlives the line of its epoch
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
