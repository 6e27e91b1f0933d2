"""`mlaan report RUN_DIR…`: a markdown table and PNG plots from the output folders of `mlaan train`.

Each run folder holds ``metrics.jsonl`` (one JSON object per epoch: at least ``epoch``, ``test_accuracy``,
``train_loss``) and, once finished, ``metrics.json`` (``test_accuracy``, ``test_error``, ``best_accuracy``,
``peak_memory_bytes``, ``total_wall_time_seconds``, ``steps``, ``config``). An unfinished run is reported from its
last epoch line. A run's method is named with the non-default options it was trained with that the method reads
(``dgl+mlaan lam_trunk=twins``, from its config). Runs are grouped by what makes their test errors comparable (data
set, architecture, data subset, batch, epochs and steps trained); Δ columns compare within a group only, against a
base run chosen with ``--bp``/``--base`` when a group has several. Writes ``report.md``, ``curves.png`` (test
accuracy and training loss per epoch, one colour per method) and ``memory.png`` (peak training memory per run: on
CPU the exact accounting of a training step, as ``mlaan bench memory``, since the process's RSS is mostly the torch
runtime) into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..engine.options import option_fields, options_ignored
from ..runtime import format_bytes

# Imported now, not when first needed: `bench accuracy` keeps a process running for days, and a module first
# imported after the code was updated would meet the old versions of those already loaded (an ImportError).
from ..training import checkpoint as ckpt_io
from ..training import metrics_log
from . import common

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _find(config: object, *names: str) -> object:
    """The first value under any of ``names`` in a (possibly nested) config dict."""
    if isinstance(config, dict):
        for name in names:
            if name in config and not isinstance(config[name], dict):
                return config[name]
        for value in config.values():
            found = _find(value, *names)
            if found is not None:
                return found
    return None


# What must be equal for two runs' test errors to be compared: the data, the network and the training budget.
COMPARABLE_KEYS = ("dataset", "arch", "train_samples", "test_samples", "image_size", "batch_size", "epochs",
                   "steps")


def _read_lines(path: Path) -> list[dict]:
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: not a JSON object")
        records.append(record)
    return records


def _one_per_epoch(records: list[dict]) -> list[dict]:
    """The last line of each epoch: a run stopped with --max-steps and resumed logged its epoch twice (older
    versions of mlaan train kept both lines)."""
    by_epoch: dict[object, dict] = {}
    for record in records:
        by_epoch[record.get("epoch")] = record
    return list(by_epoch.values())


def load_run(path: str | Path) -> dict:
    """A run folder's epochs (one record each) and final metrics; ValueError when it is not a run of
    `mlaan train`. Epochs, steps and wall time count every resumed segment. ``name`` is the folder's name;
    :func:`write_report` replaces it by one that tells same-named folders apart (:func:`run_names`)."""
    run = Path(path)
    if run.exists() and not run.is_dir():
        raise ValueError(f"run folder {str(run)!r} is a file: give the output folder of `mlaan train` "
                         f"({str(run.parent)!r} for its metrics files)")
    if not run.is_dir():
        raise ValueError(f"run folder {str(run)!r} does not exist")
    lines_path, final_path = run / "metrics.jsonl", run / "metrics.json"
    if not lines_path.exists() and not final_path.exists():
        raise ValueError(f"{str(run)!r} has neither metrics.jsonl nor metrics.json, nor has any folder below it: "
                         "not an `mlaan train` output")
    epochs = _one_per_epoch(_read_lines(lines_path)) if lines_path.exists() else []
    final: dict = {}
    if final_path.exists():
        try:
            final = json.loads(final_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{final_path}: not JSON ({err.msg})") from None
        if not isinstance(final, dict):
            raise ValueError(f"{final_path}: not a JSON object")
    config = final.get("config")
    if config is None:
        config = _checkpoint_config(run)
    config = config if isinstance(config, dict) else {}
    last = epochs[-1] if epochs else {}
    accuracy = final.get("test_accuracy", last.get("test_accuracy"))
    error = final.get("test_error")
    if error is None and accuracy is not None:
        error = 1.0 - accuracy
    accs = [e["test_accuracy"] for e in epochs if e.get("test_accuracy") is not None]
    method = _find(config, "method") or run.name
    k = _find(config, "local_modules", "num_local_modules", "k", "K")
    steps = final.get("steps", last.get("step"))
    data = final.get("dataset") if isinstance(final.get("dataset"), dict) else {}
    wall = final.get("total_wall_time_seconds", final.get("wall_time_seconds", final.get("wall_time")))
    if wall is None and epochs and all("epoch_seconds" in e for e in epochs):
        wall = sum(e["epoch_seconds"] for e in epochs)  # an unfinished run: its epochs' training time
    return {
        "path": str(run),
        "name": run.name,
        "method": str(method),
        "arch": _find(config, "arch", "architecture", "model"),
        "k": k,
        "dataset": data.get("name") or _find(config, "dataset"),
        "in_channels": data.get("in_channels"),
        "image_size": data.get("image_size") or config.get("synthetic_image_size"),
        "epochs": epochs,
        "num_epochs": _epochs_done(final, epochs, steps),
        # one definition of finished (metrics_log.summary_finished): the whole schedule trained; a metrics.json of
        # a run that ended on --max-steps before it is "stopped"
        "finished": bool(final) and metrics_log.summary_finished(final),
        "stopped": bool(final) and not metrics_log.summary_finished(final),
        "steps": steps,
        "planned_steps": _planned_steps(final, config),
        "test_accuracy": accuracy,
        "test_error": error,
        "best_accuracy": final.get("best_accuracy", max(accs) if accs else None),
        "peak_memory_bytes": final.get("peak_memory_bytes", last.get("peak_memory_bytes")),
        "peak_memory_kind": final.get("peak_memory_kind", last.get("peak_memory_kind")),
        "wall_time": wall,
        "config": config,
        "method_options": method_options(str(method), config),
    }


def method_options(method: str, config: dict) -> dict:
    """The engine and method options in a run's ``config`` that differ from their defaults and that ``method``
    reads with them (asked of the method, :func:`mlaan.engine.options.options_ignored`: a ``lam_trunk`` recorded in
    a dgl run's config is not its own): what tells two runs of one method apart (:func:`method_label`). A method
    not installed here cannot be asked: every option that differs is kept."""
    defaults = {f.name: f.default for f in option_fields(include_derived=False)}
    given = {name: config[name] for name in defaults if name in config}
    changed = {name: value for name, value in given.items()
               if (list(value) if isinstance(value, tuple) else value)
               != (list(defaults[name]) if isinstance(defaults[name], tuple) else defaults[name])}
    try:
        unused = options_ignored(method, given)
    except ValueError:  # a plug-in method that is not installed here
        unused = frozenset()
    return {name: value for name, value in changed.items() if name not in unused}


def method_label(run: dict) -> str:
    """The run's method followed by the non-default options it was trained with (:func:`method_options`), as `mlaan
    bench accuracy` names an arm of ``--vary``: ``dgl+mlaan lam_trunk=twins``; the method alone for none."""
    options = common.options_text(run.get("method_options") or {})
    return f"{run['method']} {options}" if options else run["method"]


def run_names(paths: list[str | Path]) -> list[str]:
    """A name per run folder that tells it from the others: its folder's name, or, where another run's folder has
    the same name, the shortest trailing part of its path that differs (``a/bp``, ``b/bp``)."""
    # Absolute, not resolved: `.` gets its folder's name, yet a symlinked folder keeps the name it was given by.
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    return [_tail(own, [other for j, other in enumerate(parts) if j != i]) for i, own in enumerate(parts)]


def _tail(own: tuple[str, ...], others: list[tuple[str, ...]]) -> str:
    """The fewest trailing parts of ``own`` that end none of ``others`` the same way (all of ``own`` if none do)."""
    for n in range(1, len(own)):
        if all(other[-n:] != own[-n:] for other in others):
            return "/".join(own[-n:])
    return str(Path(*own))


def _checkpoint_config(run: Path) -> dict | None:
    """An unfinished run's options, from its last checkpoint (a run folder stands for its ``last.pt``); None
    when it has none that can be read."""
    try:
        return ckpt_io.load_training_checkpoint(run).get("config")
    except (OSError, ValueError):
        return None


def _epochs_done(final: dict, epochs: list[dict], steps: object) -> float | None:
    """Epochs trained, a stopped one counted by its share of steps (every resumed segment included)."""
    per_epoch = final.get("steps_per_epoch")
    if per_epoch is None:
        complete = [e for e in epochs if e.get("complete", True) and e.get("step")]
        if complete:
            per_epoch = complete[-1]["step"] / complete[-1]["epoch"]
    if per_epoch and isinstance(steps, (int, float)):
        return steps / per_epoch
    if epochs:
        return float(sum(1 for e in epochs if e.get("complete", True)))
    return final.get("epochs_completed")


def comparable_key(run: dict) -> tuple:
    """What two runs must share for their test errors to be compared (:data:`COMPARABLE_KEYS`)."""
    config = run["config"]
    values = {"dataset": run["dataset"], "arch": run["arch"], "image_size": run["image_size"], "steps": run["steps"]}
    return tuple(values[key] if key in values else config.get(key) for key in COMPARABLE_KEYS)


def group_runs(runs: list[dict]) -> list[list[dict]]:
    """Runs grouped by :func:`comparable_key`, in the order first listed."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(comparable_key(r), []).append(r)
    return list(groups.values())


def describe_group(group: list[dict]) -> str:
    """``synthetic, resnet20, batch 32, 4 steps (0.50 of 1 epoch)``: what the runs of a group share."""
    r = group[0]
    config = r["config"]
    parts = [str(r["dataset"] or "data set unknown"), str(r["arch"] or "arch unknown")]
    if config.get("train_samples"):
        parts.append(f"first {config['train_samples']} training images")
    if config.get("batch_size"):
        parts.append(f"batch {config['batch_size']}")
    if r["steps"] is not None:
        planned = (f" ({_fmt_epochs(r['num_epochs'])} of {common.plural(config['epochs'], 'epoch')})"
                   if config.get("epochs") and r["num_epochs"] is not None else "")
        parts.append(f"{r['steps']} steps{planned}")
    return ", ".join(parts)


def differences(groups: list[list[dict]]) -> list[str]:
    """``dataset: synthetic vs fashion-mnist``: each comparable key on which the groups disagree."""
    out = []
    keys = [comparable_key(g[0]) for g in groups]
    for i, name in enumerate(COMPARABLE_KEYS):
        values = list(dict.fromkeys(str(k[i]) for k in keys))
        if len(values) > 1:
            out.append(f"{name}: {' vs '.join(values)}")
    return out


def _fmt_epochs(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f}" if abs(value - round(value)) < 1e-9 else f"{value:.2f}"


def base_method(method: str) -> str | None:
    """``dgl+mlaan`` → ``dgl``; None for a method without a suffix."""
    base, sep, _ = method.partition("+")
    return base if sep else None


def _chosen(candidates: list[dict], chosen: list[str], what: str, notes: list[str], flag: str = "--base"
            ) -> dict | None:
    """The one candidate base run, or the one the user chose (by folder or name); None (with a note) if several
    fit and none was chosen."""
    if not candidates:
        return None
    picked = [r for r in candidates if any(_is_choice(r, c) for c in chosen)]
    if len(picked) == 1:
        return picked[0]
    if len(candidates) == 1:
        return candidates[0]
    names = ", ".join(r["name"] for r in candidates)
    notes.append(f"{len(candidates)} {what} runs ({names}): no Δ against them; choose one with "
                 f"{flag} RUN_DIR")
    return None


def _is_choice(run: dict, choice: str) -> bool:
    """Whether ``--bp``/``--base`` ``choice`` names ``run``: its folder (spelled any way) or its name."""
    return choice in (run["path"], run["name"]) or Path(choice).resolve() == Path(run["path"]).resolve()


def check_chosen(runs: list[dict], bp: str | None, bases: tuple[str, ...]) -> None:
    """ValueError unless ``bp`` (folder or name) is one of ``runs`` and trains end to end, and each of ``bases`` is
    one of ``runs`` and a base method (no ``+``): a wrong choice would otherwise be ignored without a word."""
    def find(choice: str, flag: str) -> dict:
        for r in runs:
            if _is_choice(r, choice):
                return r
        raise ValueError(f"{flag} {choice}: not one of the runs given ({', '.join(r['name'] for r in runs)})")

    if bp is not None and not common.end_to_end((run := find(bp, "--bp"))["method"]):
        raise ValueError(f"--bp {bp}: that run trains {run['method']}, not end to end (bp)")
    for base in bases:
        method = (run := find(base, "--base"))["method"]
        if base_method(method) is not None or common.end_to_end(method):
            raise ValueError(f"--base {base}: that run trains {run['method']}, not a base method (dgl, infopro, …)")


def table(runs: list[dict], bp: str | None = None, bases: tuple[str, ...] = (), notes: list[str] | None = None,
          memory: dict[str, int | None] | None = None) -> str:
    """Markdown for one group of comparable runs: test error, Δ vs BP and Δ vs the base method (percentage
    points), memory, time. ``bp``/``bases``: the base runs chosen (folder or name) when a group has several."""
    notes = notes if notes is not None else []
    chosen = [c for c in (bp, *bases) if c]
    end_to_end = [r for r in runs if common.end_to_end(r["method"])]
    bp_run = _chosen(end_to_end, chosen, "/".join(dict.fromkeys(r["method"] for r in end_to_end)), notes, "--bp")
    base_runs = {m: _chosen([r for r in runs if r["method"] == m], chosen, m, notes)
                 for m in dict.fromkeys(base_method(r["method"]) for r in runs) if m}
    rows = []
    for r in runs:
        err = r["test_error"]

        def delta(other: dict | None, run: dict = r, err: float | None = err) -> str:
            if other is None or other is run or err is None or other["test_error"] is None:
                return "—"
            return f"{100 * (err - other['test_error']):+.2f}"

        mem = (memory or {}).get(r["path"], r["peak_memory_bytes"])
        rows.append(
            [
                r["name"],
                method_label(r),
                r["arch"] or "—",
                r["k"] if r["k"] is not None else "—",
                _fmt_epochs(r["num_epochs"]),
                "—" if r["steps"] is None else r["steps"],
                "—" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.2f}",
                "—" if err is None else f"{100 * err:.2f}",
                delta(bp_run),
                delta(base_runs.get(base_method(r["method"]) or "")),
                "—" if r["best_accuracy"] is None else f"{100 * r['best_accuracy']:.2f}",
                format_bytes(mem),
                "—" if r["wall_time"] is None else f"{r['wall_time'] / 60:.1f}",
                _finished_text(r),
            ]
        )
    return common.format_table(
        ["run", "method", "arch", "K", "epochs", "steps", "test acc %", "test error %", "Δ vs BP (pp)",
         "Δ vs base (pp)", "best acc %", "peak memory" + (" (accounted)" if memory is not None else " (recorded)"),
         "wall min", "finished"],
        rows,
    )


def _planned_steps(final: dict, config: dict) -> int | None:
    """The steps of the whole schedule (``--epochs`` × steps per epoch), when the run's summary says."""
    per_epoch, epochs = final.get("steps_per_epoch"), config.get("epochs")
    return per_epoch * epochs if isinstance(per_epoch, int) and isinstance(epochs, int) else None


def _finished_text(run: dict) -> str:
    """"yes" for a run that trained its whole schedule; a run that ended early on ``--max-steps`` says so (it
    finished its budget, not its schedule: not finished, :func:`mlaan.training.metrics_log.summary_finished`)."""
    if run["finished"]:
        return "yes"
    if not run.get("stopped"):
        return "no"
    planned, steps = run.get("planned_steps"), run["steps"]
    return f"--max-steps ({steps} of {planned})" if planned is not None and steps is not None else "--max-steps"


def _styles(runs: list[dict]) -> list[tuple[str, str]]:
    """A colour per method (the benchmarks' palette); repeated methods get other line styles."""
    seen: dict[str, int] = {}
    methods = list(dict.fromkeys(r["method"] for r in runs))
    out = []
    for r in runs:
        n = seen.get(r["method"], 0)
        seen[r["method"]] = n + 1
        out.append((common.method_color(r["method"], methods.index(r["method"])), ("-", "--", ":", "-.")[n % 4]))
    return out


def _epoch_x(record: dict, run: dict) -> float | None:
    """Where an epoch's line sits on the epoch axis: its epoch, or its share of steps when cut short."""
    epoch = record.get("epoch")
    if epoch is None or record.get("complete", True) or not run["steps"] or not run["num_epochs"]:
        return epoch
    return record["step"] / (run["steps"] / run["num_epochs"]) if record.get("step") else epoch


def run_label(run: dict, runs: list[dict], sep: str = " ") -> str:
    """A run's legend entry or bar label: its method with its non-default options (:func:`method_label`), followed
    (after ``sep``) by its name in brackets (:func:`run_names`) when another of ``runs`` has the same label."""
    own = method_label(run)
    alone = sum(method_label(other) == own for other in runs) == 1
    return own if alone else f"{own}{sep}({run['name']})"


def plot_curves(runs: list[dict], path: Path, title: str = "") -> None:
    """Test accuracy and training loss per epoch, a line per run; the epoch axis has integer ticks unless a run
    stopped mid-epoch (its last point sits at its share of the epoch)."""
    plt = common.pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(13, 4.8))
    xs: list[float] = []
    for r, (color, style) in zip(runs, _styles(runs)):
        for ax, key, scale in ((ax_acc, "test_accuracy", 100), (ax_loss, "train_loss", 1)):
            points = [(_epoch_x(e, r), e.get(key)) for e in r["epochs"]]
            points = [(x, y) for x, y in points if x is not None and y is not None]
            if points:
                ax.plot([x for x, _ in points], [scale * y for _, y in points], style, color=color,
                        label=run_label(r, runs), marker="o", markersize=3)
                xs += [x for x, _ in points]
    if common.whole(xs):
        for ax in (ax_acc, ax_loss):
            common.integer_ticks(ax.xaxis)
    common.save_panels(fig, [
        (ax_acc, "epoch", "test accuracy (%)", "test accuracy per epoch"),
        (ax_loss, "epoch", "training loss (last module)", "training loss per epoch"),
    ], path, title)


MEMORY_CHOICES = ("auto", "recorded", "accounted", "none")


def memory_source(runs: list[dict], choice: str) -> str:
    """``recorded`` (what mlaan train measured) or ``accounted``: ``auto`` takes the accounting as soon as a run
    recorded the CPU's peak RSS, which is mostly the Python/torch runtime and the same for every method."""
    if choice not in MEMORY_CHOICES:
        raise ValueError(f"unknown --memory {choice!r}; allowed: {', '.join(MEMORY_CHOICES)}")
    if choice != "auto":
        return choice
    return "accounted" if any(r["peak_memory_kind"] == "cpu_peak_rss" for r in runs) else "recorded"


def accounted_memory(run: dict, log=print) -> int | None:
    """Peak training memory of one step of ``run``'s configuration at its batch size, by the exact accounting of
    ``mlaan bench memory``; None when the run's folder does not say enough to rebuild it."""
    from ..engine import parse_method
    from ..training.config import OPTION_NAMES
    from .memory import measure_case

    config = run["config"]
    needed = (run["arch"], config.get("batch_size"), run["k"], run["in_channels"])
    if any(v is None for v in needed):
        return None
    try:
        parse_method(run["method"])
    except ValueError:  # a plug-in method that is not installed here: its other figures still count
        log(f"  {run['name']}: method {run['method']!r} is not installed here, so its memory is not accounted")
        return None
    options = {name: config[name] for name in OPTION_NAMES if name in config}
    log(f"  accounting {run['name']}: {run['arch']} {run['method']} K={run['k']}, batch {config['batch_size']}")
    result = measure_case(run["arch"], run["method"], int(run["k"]), int(config["batch_size"]), device="cpu",
                          in_channels=int(run["in_channels"]), image_size=run["image_size"], options=options,
                          seed=int(config.get("seed", 0)))
    return int(result["peak_bytes"])


def plot_memory(runs: list[dict], path: Path, title: str = "", memory: dict[str, int | None] | None = None,
                what: str | None = None) -> bool:
    """Bars of peak training memory (``memory``: run path → bytes, else what each run recorded); returns False
    (and writes nothing) when there is nothing to chart."""
    def value(r: dict) -> int | None:
        return memory.get(r["path"]) if memory is not None else r["peak_memory_bytes"]

    rs = [(r, s) for r, s in zip(runs, _styles(runs)) if value(r)]
    if not rs:
        return False
    if what is None:
        kinds = {r.get("peak_memory_kind") for r, _ in rs}
        what = "CUDA max allocated" if kinds == {"cuda_max_memory_allocated"} else (
            "peak RSS of the process" if kinds == {"cpu_peak_rss"} else "as recorded by mlaan train")
    common.save_figure(_memory_figure(rs, value, title, what), path)
    return True


def _memory_figure(rs: list[tuple[dict, tuple[str, str]]], value: Callable[[dict], int | None], title: str,
                   what: str) -> Figure:
    """The bar chart of :func:`plot_memory`: a bar per (run, style) of ``rs``, its height ``value(run)``."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rs) + 2), 4.6))
    values = [value(r) / 2**20 for r, _ in rs]
    bars = ax.bar(range(len(rs)), values, color=[s[0] for _, s in rs])
    bp = next((r for r, _ in rs if common.end_to_end(r["method"])), None)
    bp_runs = sum(common.end_to_end(r["method"]) for r, _ in rs)
    for bar, (r, _) in zip(bars, rs):
        text = f"{value(r) / 2**20:.0f} MiB"
        if bp is not None and bp_runs == 1:
            text += f"\n{100 * value(r) / value(bp):.0f}% of BP"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_xticks(range(len(rs)))
    ax.set_xticklabels([run_label(r, [r for r, _ in rs], "\n") for r, _ in rs], rotation=30, ha="right",
                       fontsize=9)
    # What was measured goes on lines of its own: in one line with the quantity it was longer than the axis.
    ax.set_ylabel("peak training memory (MiB)\n" + textwrap.fill(what, 40), fontsize=9)
    ax.set_title(title or "peak training memory per run")
    ax.set_ylim(0, max(values) * 1.25)
    ax.grid(axis="y", alpha=0.3)
    return fig


def find_runs(paths: list[str | Path]) -> list[Path]:
    """The run folders ``paths`` name: each one that holds a run, and for a folder of runs (``runs/``, a ``mlaan
    bench accuracy`` output) every run below it, in name order. A path with no run in or below it is left for
    :func:`load_run` to refuse."""
    found: list[Path] = []
    for path in map(Path, paths):
        below = [] if _is_run(path) or not path.is_dir() else sorted(
            {f.parent for name in ("metrics.jsonl", "metrics.json") for f in path.rglob(name)})
        found += below or [path]
    return list(dict.fromkeys(found))  # a run named twice (a folder and its parent) is reported once


def _is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").exists() or (path / "metrics.json").exists()


def write_report(run_dirs: list[str | Path], output_dir: str | Path, title: str = "mlaan report",
                 bp: str | None = None, bases: tuple[str, ...] = (), memory: str = "auto", log=print) -> dict:
    """Load the runs and write report.md, curves.png and (when memory is charted) memory.png; without matplotlib
    (an optional extra) the plots are left out, with one line on stderr saying so.

    Runs are grouped by what makes them comparable (:data:`COMPARABLE_KEYS`); Δ columns compare runs of a group
    only, against the base run chosen with ``bp``/``bases`` when a group has several. ``memory``: see
    :func:`memory_source` (``none`` leaves the chart out)."""
    if not run_dirs:
        raise ValueError("no run folder given")
    folders = find_runs(run_dirs)
    runs = [{**load_run(d), "name": name} for d, name in zip(folders, run_names(folders))]
    check_chosen(runs, bp, bases)
    source = memory_source(runs, memory)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, int | None] | None = None
    what = None
    if source == "accounted":
        figures = {r["path"]: accounted_memory(r, log) for r in runs}
        what = "exact accounting of a training step, as mlaan bench memory"
    groups = group_runs(runs)
    lines = [f"# {title}", ""]
    notes: list[str] = []
    tables = []
    if len(groups) > 1:
        lines += [f"The runs fall into {len(groups)} groups that are not compared with each other; they differ in "
                  + "; ".join(differences(groups)) + ".", ""]
    for i, group in enumerate(groups, 1):
        group_notes: list[str] = []
        md = table(group, bp, bases, group_notes, memory=figures)
        heading = f"## {'Group ' + str(i) + ': ' if len(groups) > 1 else ''}{describe_group(group)}"
        lines += [heading, "", md, ""]
        lines += [f"- {note}" for note in group_notes] + ([""] if group_notes else [])
        notes += group_notes
        tables.append(f"{describe_group(group)}\n{md}")
    lines += ["Δ: test-error difference in percentage points (negative is better), within a group only. "
              "Epochs, steps and wall time count every resumed segment."]
    plots = common.plots_or_note()
    if plots:
        plot_curves(runs, out / "curves.png", title)
        lines += ["", "![test accuracy and training loss per epoch](curves.png)"]
    has_memory = plots and source != "none" and plot_memory(runs, out / "memory.png", title, figures, what)
    if has_memory:
        explain = ("peak memory: exact accounting of one training step at each run's batch size (`mlaan bench "
                   "memory`), not the process's RSS" if source == "accounted" else "peak memory: as recorded by "
                   "mlaan train")
        lines += ["", f"{explain}.", "", "![peak training memory per run](memory.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return {"runs": runs, "groups": groups, "notes": notes, "table": "\n\n".join(tables),
            "memory_source": source,
            "files": [str(out / name) for name, written in (("report.md", True), ("curves.png", plots),
                                                            ("memory.png", has_memory)) if written]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="output folders of `mlaan train`, or folders of them (every run below is reported)")
    p.add_argument("--output-dir", default="runs/report", help="where report.md and the PNGs go")
    p.add_argument("--title", default="mlaan report", help="heading of report.md and the plots")
    p.add_argument("--bp", default=None, metavar="RUN_DIR",
                   help="the BP run to compare against when a group has several")
    p.add_argument("--base", action="append", default=[], metavar="RUN_DIR",
                   help="the base-method run (dgl, infopro, …) to compare its +mlm/+lam/+mlaan runs against when a "
                        "group has several of that method (repeatable)")
    p.add_argument("--memory", default="auto", choices=MEMORY_CHOICES,
                   help="memory chart: recorded (what mlaan train measured), accounted (exact accounting of a "
                        "training step, as mlaan bench memory), none; auto: accounted when a run recorded CPU RSS")


def run(args: argparse.Namespace) -> int:
    if not str(args.output_dir).strip():  # Path("") is the current folder: "$UNSET" would write among its files
        raise ValueError(f"--output-dir {args.output_dir!r} is empty: name a folder (an unset shell variable?)")
    result = write_report(args.run_dirs, args.output_dir, args.title, bp=args.bp, bases=tuple(args.base),
                          memory=args.memory)
    print(result["table"])
    for note in result["notes"]:
        print(f"note: {note}")
    print("\nwrote " + ", ".join(result["files"]))
    return 0
