"""Helpers shared by the benchmarks: method lists, model/batch construction, tables, JSON, plot styling.

Plots need matplotlib, an optional extra (``pip install 'mlaan[bench]'``): it is imported only when a plot is
drawn, and a command without it says so in one line (:data:`NO_MATPLOTLIB`) and writes its tables and JSON."""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

import mlaan
from mlaan.engine import parse_method
from mlaan.engine.options import options_ignored
from mlaan.names import unknown
from mlaan.runtime import plural  # one helper for every count people read (mlaan train's banner too)
from mlaan.training.loop import make_optimizer

if TYPE_CHECKING:  # matplotlib is an optional extra
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

# The methods the issue asks to compare, in table order: the baseline, each base, its ablations, its MLAAN.
DEFAULT_METHODS = (
    "bp",
    "dgl",
    "dgl+mlm",
    "dgl+lam",
    "dgl+mlaan",
    "infopro",
    "infopro+mlm",
    "infopro+lam",
    "infopro+mlaan",
)

# One colour per method, the same in every plot.
METHOD_COLORS = {
    "bp": "#000000",
    "dgl": "#1f77b4",
    "dgl+mlm": "#17becf",
    "dgl+lam": "#9467bd",
    "dgl+mlaan": "#2ca02c",
    "infopro": "#d62728",
    "infopro+mlm": "#e377c2",
    "infopro+lam": "#8c564b",
    "infopro+mlaan": "#ff7f0e",
    "auglocal": "#bcbd22",
    "auglocal+mlm": "#7f7f7f",
    "auglocal+lam": "#c7c7c7",
    "auglocal+mlaan": "#dbdb8d",
}
_FALLBACK_COLORS = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2")


def method_color(method: str, index: int = 0) -> str:
    """The method's colour in every plot (a fallback palette, by ``index``, for methods not listed)."""
    return METHOD_COLORS.get(method, _FALLBACK_COLORS[index % len(_FALLBACK_COLORS)])


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """Comma-separated (or listed) method names, validated against the engine's registry."""
    names = [m.strip().lower() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    if not names:
        raise ValueError("no method given; available: " + ", ".join(mlaan.available_methods()))
    known = mlaan.available_methods()
    for name in names:
        if name not in known:
            raise ValueError(unknown("method", name, known))
    return list(dict.fromkeys(names))


def parse_ints(text: str | Sequence[int], what: str) -> list[int]:
    """``"1,2,4"`` → [1, 2, 4]; every value a positive integer."""
    items = text.split(",") if isinstance(text, str) else list(text)
    values = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"{what}: {item!r} is not an integer") from None
        if value < 1:
            raise ValueError(f"{what}: values must be positive, got {value}")
        values.append(value)
    if not values:
        raise ValueError(f"{what}: no value given")
    return list(dict.fromkeys(values))


def end_to_end(method: str) -> bool:
    """Whether ``method`` trains end to end (BP), asked of the method; False for a name no registered method has
    (a run folder may name a method from a plugin that is not installed)."""
    try:
        return parse_method(method).end_to_end
    except ValueError:
        return False


def model_k(method: str, k: int) -> int:
    """K as built: 1 for a method that trains end to end (asked of the method, not matched by name), else k."""
    return 1 if parse_method(method).end_to_end else k


def check_arch(arch: str) -> str:
    """``arch`` as the library spells it when it takes it (registered, in any case, or ``torchvision:NAME`` /
    ``timm:NAME``), else the library's one-line ValueError (:func:`mlaan.models.check_arch`, the one source of
    truth)."""
    return mlaan.models.check_arch(arch)


RECOMPUTE_CHOICES = ("off", "on", "both")


def check_options(methods: Iterable[str], options: dict, what: str = "--option",
                  cases: Iterable[tuple[str, int]] = (), set_by: Mapping[str, str] | None = None) -> None:
    """ValueError, one line, where engine ``options`` that each hold alone (:func:`mlaan.bench.memory.parse_options`)
    cannot build one of ``methods`` together (``lam_trunk=twins`` with ``ema_lag=1`` for a LAM method) or at one of
    the ``cases`` (arch, K) (``window=9`` at K=3), or set an option the command sets itself (``set_by``: option →
    the command's flag; the command's value would silently win): checked before anything is measured, since a
    case's own process would only report it as a failed case. An option that none of ``methods`` ever reads is
    warned of (every point is built without it), as ``mlaan train`` warns of one its method does not read."""
    from mlaan.engine.local_model import check_lam_trunk, check_num_local_modules
    from mlaan.engine.options import make_options, options_unused_by, who_reads

    for name, flag in (set_by or {}).items():
        if name in options:
            raise ValueError(f"{what}: {name} is set by this command's {flag}, not by {what}")
    built = make_options(**options)
    methods = list(methods)
    for name in options:
        if methods and all(name in options_unused_by(m) for m in methods):
            warnings.warn(f"{what} {name}={option_text(options[name])}: no method of {', '.join(methods)} reads it "
                          f"(it is {who_reads(name)}); every point is built without it", stacklevel=2)
    cases = list(cases)
    for method in methods:
        try:
            check_lam_trunk(method, built)
            for arch, k in cases:
                if not end_to_end(method):
                    check_num_local_modules(parse_method(method), built, k, mlaan.models.max_local_modules(arch),
                                            arch, key="K")
        except ValueError as err:
            raise ValueError(f"{what} with {method}: {err}") from None


def plan_variants(cases: list[tuple[str, str, int]], options: dict, recompute: str) -> list[tuple[str, str, int, dict]]:
    """Each case with those of the engine ``options`` its method reads (:func:`read_options`: a BP case of
    ``lam_trunk=twins`` is built, recorded and labelled without it); methods with something to recompute (LAM,
    MLM, AugLocal, and BP's backbone: activation checkpointing) run without ``grad_checkpointing`` ("off"), with it
    ("on"), or both ways, one after the other ("both"). BP always runs plain too, first: it is what every figure
    is relative to."""
    if recompute not in RECOMPUTE_CHOICES:
        raise ValueError(f"unknown --grad-checkpointing {recompute!r}; allowed: {', '.join(RECOMPUTE_CHOICES)}")
    flags = {"off": [False], "on": [True], "both": [False, True]}[recompute]
    planned = []
    for arch, method, k in cases:
        spec = parse_method(method)
        if not spec.can_recompute:
            planned.append((arch, method, k, read_options(method, options)))
            continue
        own = [False, *(f for f in flags if f)] if spec.end_to_end else flags
        planned.extend((arch, method, k, read_options(method, {**options, "grad_checkpointing": flag}))
                       for flag in own)
    return planned


def read_options(method: str, options: dict) -> dict:
    """Those of the engine ``options`` that a run of ``method`` with them reads, asked of the method
    (:func:`mlaan.engine.options.options_ignored`: BP reads no ``lam_trunk``, nothing reads ``checkpoint_modules``
    without ``grad_checkpointing``): what a case is built with, and all that it records and its label names."""
    unused = options_ignored(method, options)
    return {name: value for name, value in options.items() if name not in unused}


def option_text(value: object) -> str:
    """An option's value as a label writes it, spelled as given on a command line: ``twins``, ``0.99``,
    ``true``, ``1,2`` (a list)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(option_text, value))
    return str(value)


def options_text(options: dict) -> str:
    """``lam_trunk=twins window=3``: engine options as a label names them after a method's name (``bench
    accuracy``'s ``--vary`` arms, ``dgl+mlaan lam_trunk=twins``); empty for none."""
    return " ".join(f"{name}={option_text(value)}" for name, value in options.items())


def label(result: dict) -> str:
    """The method's name, marked when it ran with ``grad_checkpointing`` (``bp +ckpt``: BP with activation
    checkpointing of every block; ``bp +ckpt seg=3``: of segments of 3 blocks; ``dgl+mlaan +ckpt first=8``:
    recomputing in the first 8 local modules only; ``trunk=lead``: only each aux trunk's first block)."""
    options = result.get("options") or {}
    if not options.get("grad_checkpointing"):
        return result["method"]
    segment, first = options.get("checkpoint_segment", 1), options.get("checkpoint_modules", 0)
    if end_to_end(result["method"]):
        return result["method"] + " +ckpt" + (f" seg={segment}" if segment != 1 else "")
    lead = " trunk=lead" if options.get("checkpoint_trunk", "all") == "lead" else ""
    return result["method"] + " +ckpt" + (f" first={first}" if first else "") + lead


def label_with_options(result: dict) -> str:
    """:func:`label` with the other engine options the case was built with after the method's name, as `bench
    frontier` writes a variant's label: ``dgl+mlaan lam_trunk=twins +ckpt`` (the recomputation options that
    :func:`label` itself shows are not repeated)."""
    plain = label(result)
    shown = {"grad_checkpointing", *(("checkpoint_segment",) if end_to_end(result["method"])
                                      else ("checkpoint_modules", "checkpoint_trunk"))}
    rest = options_text({k: v for k, v in (result.get("options") or {}).items() if k not in shown})
    return f"{result['method']} {rest}{plain[len(result['method']):]}" if rest else plain


def is_reference(result: dict) -> bool:
    """Whether a result is plain BP's (an end-to-end method without activation checkpointing): the reference every
    ratio and percentage is taken to."""
    return end_to_end(result["method"]) and not (result.get("options") or {}).get("grad_checkpointing")


def build(
    arch: str,
    method: str,
    k: int,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    **options: object,
) -> tuple[mlaan.LocalModel, torch.optim.Optimizer]:
    """A local model (K forced to 1 for an end-to-end method) and the paper's optimizer (SGD, Nesterov, momentum
    0.9, wd 1e-4)."""
    torch.manual_seed(seed)
    k = model_k(method, k)
    model = mlaan.create_local_model(  # an option given for every method goes to those that read it
        arch, method=method, num_local_modules=k, num_classes=num_classes, in_channels=in_channels,
        image_size=image_size, **read_options(method, options),
    ).to(device)
    model.train()
    return model, make_optimizer(model)


def synthetic_batch(
    model: mlaan.LocalModel, batch: int, num_classes: int = 10, device: str | torch.device = "cpu", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A CIFAR-shaped (or the model's image shape) random batch; benchmarks of cost need no real data."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, *model.image_shape, generator=g)
    targets = torch.randint(0, num_classes, (batch,), generator=g)
    return images.to(device), targets.to(device)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table (also readable in a terminal)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(line(r) for r in cells[1:])
    return "\n".join(out)


def machine_description(threads: str | None = None) -> str:
    """What the figures were measured on, e.g. "2-core CPU (x86_64), torch 2.14.1, 2 threads, no GPU" or the
    CUDA card's name. ``threads``: how many threads the measured work used, when not this process's own (a
    harness whose runs are processes of their own)."""
    cores = os.cpu_count() or 0
    if threads is None:
        threads = plural(torch.get_num_threads(), "thread")
    cpu = f"{cores}-core CPU ({platform.machine()}), torch {torch.__version__}, {threads}"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}; host {cpu}"
    return f"{cpu}, no GPU"


def code_version() -> str:
    """The repository commit the benchmark ran on (``+dirty`` when engine/model files differ from it)."""
    import subprocess

    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src/mlaan/engine", "src/mlaan/models"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"mlaan {mlaan.__version__}"
    if not head:
        return f"mlaan {mlaan.__version__}"
    return f"{head}{'+dirty' if dirty else ''}"


def output_dir(path: str | None, name: str) -> Path:
    """``path``, or ``runs/bench-<name>`` by default; created."""
    out = Path(path) if path else Path("runs") / f"bench-{name}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, data: object) -> None:
    """``data`` as indented JSON, written to a temporary file then renamed (a reader never sees half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


NO_MATPLOTLIB = "plots need matplotlib: pip install 'mlaan[bench]'"


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed (an optional extra): no plot can be drawn."""


def plots_available() -> bool:
    """Whether matplotlib can be imported (it is imported here, once, when it can)."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return False
    return True


def plots_or_note() -> bool:
    """Whether plots can be drawn; when not, prints :data:`NO_MATPLOTLIB` (one line, on stderr) for the command
    to go on with its tables and JSON."""
    if plots_available():
        return True
    print(NO_MATPLOTLIB, file=sys.stderr, flush=True)
    return False


def write_outputs(out: Path, name: str, table: str, data: object,
                  plot: Callable[[Path], object] | None = None) -> list[Path]:
    """A benchmark's outputs: the markdown ``table`` printed and written to ``OUT/NAME.md``, ``data`` to
    ``OUT/NAME.json`` and, where matplotlib is installed, ``plot(OUT/NAME.png)``; the files written are said in one
    line and returned."""
    print("\n" + table, flush=True)
    (out / f"{name}.md").write_text(table + "\n")
    write_json(out / f"{name}.json", data)
    files = [out / f"{name}.json", out / f"{name}.md"]
    if plot is not None and plots_or_note():
        plot(out / f"{name}.png")
        files.append(out / f"{name}.png")
    print(f"\nwrote {', '.join(map(str, files))}", flush=True)
    return files


def pyplot() -> ModuleType:
    """matplotlib's pyplot on the non-interactive Agg backend; :class:`PlotsUnavailable` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotsUnavailable(NO_MATPLOTLIB) from None
    return plt


def save_panels(fig, panels: Sequence[tuple[object, str, str, str]], path: Path, title: str = "") -> None:
    """Label each ``(axes, x label, y label, title)`` panel, grid it, add its legend when it has lines, then save
    the figure to ``path`` (:func:`save_figure`)."""
    for ax, xlabel, ylabel, panel_title in panels:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def save_figure(fig: Figure, path: Path) -> None:
    """Lay ``fig`` out, save it to ``path`` (PNG, 120 dpi) and close it. The saved box is the drawing's own
    (``bbox_inches="tight"``): a label longer than the layout allows is kept whole rather than cut at the edge."""
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)


def whole(values: Iterable[float]) -> bool:
    """Whether every value is a whole number (and there is one): the axis of a count, not a measure."""
    values = list(values)
    return bool(values) and all(float(v).is_integer() for v in values)


def integer_ticks(axis: Axis) -> None:
    """Ticks at integers only on ``axis`` (``ax.xaxis``): an epoch or module index of 1.25 does not exist."""
    from matplotlib.ticker import MaxNLocator

    # min_n_ticks=1: with the default (2) a lone point (a one-epoch run) would get fractional ticks around it.
    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
