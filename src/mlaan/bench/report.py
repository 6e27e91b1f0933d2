"""`mlaan report RUN_DIR…`: a markdown table and PNG plots from the output folders of `mlaan train`.

Each run folder holds ``metrics.jsonl`` (one JSON object per epoch: at least ``epoch``, ``test_accuracy``,
``train_loss``) and, once finished, ``metrics.json`` (``test_accuracy``, ``test_error``, ``best_accuracy``,
``peak_memory_bytes``, ``wall_time``, ``steps``, ``config``). An unfinished run is reported from its last
epoch line. Writes ``report.md``, ``curves.png`` (test accuracy and training loss per epoch, one colour per
method) and ``memory.png`` (peak training memory per run) into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import common


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


def load_run(path: str | Path) -> dict:
    """A run folder's epochs and final metrics; ValueError when it is not a run of `mlaan train`."""
    run = Path(path)
    if not run.is_dir():
        raise ValueError(f"run folder {str(run)!r} does not exist")
    lines_path, final_path = run / "metrics.jsonl", run / "metrics.json"
    if not lines_path.exists() and not final_path.exists():
        raise ValueError(f"{str(run)!r} has neither metrics.jsonl nor metrics.json: not an `mlaan train` output")
    epochs = []
    if lines_path.exists():
        for n, line in enumerate(lines_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                epochs.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{lines_path}:{n}: not JSON ({err.msg})") from None
    final: dict = {}
    if final_path.exists():
        try:
            final = json.loads(final_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{final_path}: not JSON ({err.msg})") from None
    config = final.get("config")
    if config is None and (run / "config.json").exists():
        config = json.loads((run / "config.json").read_text())
    config = config or {}
    last = epochs[-1] if epochs else {}
    accuracy = final.get("test_accuracy", last.get("test_accuracy"))
    error = final.get("test_error")
    if error is None and accuracy is not None:
        error = 1.0 - accuracy
    accs = [e["test_accuracy"] for e in epochs if e.get("test_accuracy") is not None]
    method = _find(config, "method") or run.name
    k = _find(config, "local_modules", "num_local_modules", "k", "K")
    return {
        "path": str(run),
        "name": run.name,
        "method": str(method),
        "arch": _find(config, "arch", "architecture", "model"),
        "k": k,
        "epochs": epochs,
        "num_epochs": len(epochs) or final.get("epochs"),
        "finished": bool(final),
        "test_accuracy": accuracy,
        "test_error": error,
        "best_accuracy": final.get("best_accuracy", max(accs) if accs else None),
        "peak_memory_bytes": final.get("peak_memory_bytes"),
        "peak_memory_kind": final.get("peak_memory_kind"),
        "wall_time": final.get("wall_time_seconds", final.get("wall_time")),
        "steps": final.get("steps"),
        "config": config,
    }


def base_method(method: str) -> str | None:
    """``dgl+mlaan`` → ``dgl``; None for a method without a suffix."""
    base, sep, _ = method.partition("+")
    return base if sep else None


def table(runs: list[dict]) -> str:
    """Markdown: test error, Δ vs BP and Δ vs the base method (percentage points), memory, time."""
    by_method = {r["method"]: r for r in runs}
    bp = by_method.get("bp")
    rows = []
    for r in runs:
        err = r["test_error"]

        def delta(other: dict | None, run: dict = r, err: float | None = err) -> str:
            if other is None or other is run or err is None or other["test_error"] is None:
                return "—"
            return f"{100 * (err - other['test_error']):+.2f}"

        base = by_method.get(base_method(r["method"]) or "")
        rows.append(
            [
                r["name"],
                r["method"],
                r["arch"] or "—",
                r["k"] if r["k"] is not None else "—",
                r["num_epochs"] if r["num_epochs"] is not None else "—",
                "—" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.2f}",
                "—" if err is None else f"{100 * err:.2f}",
                delta(bp),
                delta(base),
                "—" if r["best_accuracy"] is None else f"{100 * r['best_accuracy']:.2f}",
                common.human_bytes(r["peak_memory_bytes"]),
                "—" if r["wall_time"] is None else f"{r['wall_time'] / 60:.1f}",
                "yes" if r["finished"] else "no",
            ]
        )
    return common.format_table(
        ["run", "method", "arch", "K", "epochs", "test acc %", "test error %", "Δ vs BP (pp)",
         "Δ vs base (pp)", "best acc %", "peak memory", "wall min", "finished"],
        rows,
    )


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


def plot_curves(runs: list[dict], path: Path, title: str = "") -> None:
    plt = common.pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(13, 4.8))
    for r, (color, style) in zip(runs, _styles(runs)):
        label = r["method"] if sum(x["method"] == r["method"] for x in runs) == 1 else f"{r['method']} ({r['name']})"
        points = [(e.get("epoch"), e.get("test_accuracy")) for e in r["epochs"]]
        points = [(x, y) for x, y in points if x is not None and y is not None]
        if points:
            ax_acc.plot([x for x, _ in points], [100 * y for _, y in points], style, color=color, label=label,
                        marker="o", markersize=3)
        losses = [(e.get("epoch"), e.get("train_loss")) for e in r["epochs"]]
        losses = [(x, y) for x, y in losses if x is not None and y is not None]
        if losses:
            ax_loss.plot([x for x, _ in losses], [y for _, y in losses], style, color=color, label=label,
                         marker="o", markersize=3)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_title("test accuracy per epoch")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (last module)")
    ax_loss.set_title("training loss per epoch")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory(runs: list[dict], path: Path, title: str = "") -> bool:
    """Bars of peak training memory; returns False (and writes nothing) when no run recorded it."""
    rs = [(r, s) for r, s in zip(runs, _styles(runs)) if r["peak_memory_bytes"]]
    if not rs:
        return False
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rs) + 2), 4.6))
    values = [r["peak_memory_bytes"] / 2**20 for r, _ in rs]
    bars = ax.bar(range(len(rs)), values, color=[s[0] for _, s in rs])
    bp = next((r for r, _ in rs if r["method"] == "bp"), None)
    for bar, (r, _) in zip(bars, rs):
        text = f"{r['peak_memory_bytes'] / 2**20:.0f} MiB"
        if bp is not None:
            text += f"\n{100 * r['peak_memory_bytes'] / bp['peak_memory_bytes']:.0f}% of BP"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_xticks(range(len(rs)))
    unique = len({r["method"] for r, _ in rs}) == len(rs)
    ax.set_xticklabels([r["method"] if unique else f"{r['method']}\n{r['name']}" for r, _ in rs],
                       rotation=30, ha="right", fontsize=9)
    kinds = {r.get("peak_memory_kind") for r, _ in rs}
    what = "CUDA max allocated" if kinds == {"cuda_max_memory_allocated"} else (
        "peak RSS of the process" if kinds == {"cpu_peak_rss"} else "as recorded by mlaan train")
    ax.set_ylabel(f"peak training memory (MiB, {what})")
    ax.set_title(title or "peak training memory per run")
    ax.set_ylim(0, max(values) * 1.25)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(run_dirs: list[str | Path], output_dir: str | Path, title: str = "mlaan report") -> dict:
    """Load the runs and write report.md, curves.png and (when memory was recorded) memory.png."""
    if not run_dirs:
        raise ValueError("no run folder given")
    runs = [load_run(d) for d in run_dirs]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = table(runs)
    plot_curves(runs, out / "curves.png", title)
    has_memory = plot_memory(runs, out / "memory.png", title)
    lines = [f"# {title}", "", md, "", "Δ: test-error difference in percentage points (negative is better).", "",
             "![test accuracy and training loss per epoch](curves.png)"]
    if has_memory:
        lines += ["", "![peak training memory per run](memory.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return {"runs": runs, "table": md, "files": [str(out / "report.md"), str(out / "curves.png")]
            + ([str(out / "memory.png")] if has_memory else [])}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output folders of `mlaan train`")
    p.add_argument("--output-dir", default="runs/report", help="where report.md and the PNGs go")
    p.add_argument("--title", default="mlaan report")


def run(args: argparse.Namespace) -> int:
    result = write_report(args.run_dirs, args.output_dir, args.title)
    print(result["table"])
    print("\nwrote " + ", ".join(result["files"]))
    return 0
