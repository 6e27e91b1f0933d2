"""`mlaan bench frontier`: the memory–time frontier of one architecture and batch, every setting a point.

Every method × K × recompute setting (``grad_checkpointing`` off/on; BP's activation checkpointing of every block
and of segments of ``checkpoint_segment`` blocks) is one point: its peak training memory as a share of plain BP's
by the exact accountant (:func:`mlaan.bench.memory.measure_case`, each point in its own process), and its step time
as a multiple of plain BP's, from one interleaved timing run of all points together
(:func:`mlaan.bench.speed.interleaved_times`: the order rotates every round, so a load change hits all alike).
The Pareto set (no other point needs less memory and less time, one of them strictly) is marked; where an
accuracy report (``mlaan bench accuracy``'s accuracy.json) has the same architecture, K and method, its test
error is written beside the point (and a second Pareto set over memory, time and error is marked among the
points that have one). A setting that only recomputes (the engine's recomputation options,
:func:`mlaan.engine.engine_options.recompute_options`) computes bit-identical steps (tests/test_bp_checkpointing.py,
tests/test_selective_recompute.py), so it shares its plain method's error. A variant (``--variant
twins=lam_trunk=twins``) adds, beside the plain points and in the same interleaved run, the points of every method
that reads all of its options, built with them and named with its label (``dgl+mlaan twins``, ``dgl+mlaan twins
+ckpt``); one that sets another option than recomputation's computes other steps, so no accuracy report's error
is its.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .. import runtime
from ..engine import parse_method
from ..engine.engine_options import recompute_options
from ..engine.options import LocalOptions
from ..models import max_local_modules
from . import common, memory, speed
from .common import RECOMPUTE_CHOICES, label

DEFAULT_METHODS = "bp,dgl,dgl+lam,dgl+mlaan,infopro+mlaan"
DEFAULT_ACCURACY = Path("bench/results/accuracy-full/accuracy.json")
# Options that change how a step is computed (memory, time), never what it computes.
RECOMPUTE_OPTIONS = frozenset(recompute_options())  # what changes a step's memory and time, not its results
# Options each point gets from the command's own flags (an --option or --variant setting one would be overwritten)
SET_BY_FLAGS = {"grad_checkpointing": "--grad-checkpointing", "checkpoint_segment": "--segments"}


# ------------------------------------------------------------------------------------------------ plan
def parse_variant(item: str) -> tuple[str, dict]:
    """``"twins=lam_trunk=twins,lam_depth=2"`` → ``("twins", {"lam_trunk": "twins", "lam_depth": 2})``: a label and
    the engine options its points are built with (values read as YAML and checked by the engine,
    :func:`mlaan.bench.memory.parse_options`). ValueError naming the item when it is not
    ``LABEL=KEY=VALUE[,KEY=VALUE]`` or names an unknown option."""
    name, sep, rest = item.partition("=")
    settings = [s for s in rest.split(",") if s.strip()]
    well_formed = all(key.strip() and eq for key, eq, _ in (s.partition("=") for s in settings))
    if not sep or not name.strip() or not settings or not well_formed:
        raise ValueError(f"--variant {item!r} must be LABEL=KEY=VALUE[,KEY=VALUE], e.g. twins=lam_trunk=twins")
    if any(c.isspace() for c in name.strip()) or "+" in name:
        raise ValueError(f"--variant {item!r}: the label {name.strip()!r} must be one word without '+' "
                         "(it is written after the method's name)")
    return name.strip(), memory.parse_options(settings)


def parse_variants(items: Sequence[str]) -> dict[str, dict]:
    """Each ``--variant`` item parsed (:func:`parse_variant`), by label; ValueError for a label given twice."""
    variants: dict[str, dict] = {}
    for item in items:
        name, options = parse_variant(item)
        if name in variants:
            raise ValueError(f"--variant {item!r}: the label {name!r} is given twice")
        variants[name] = options
    return variants


def methods_reading(methods: Sequence[str], options: dict) -> list[str]:
    """Those of ``methods`` that read every one of ``options`` (asked of the method:
    :attr:`mlaan.engine.methods.MethodSpec.engine_options`, no name matching)."""
    return [m for m in methods if set(options) <= parse_method(m).engine_options]


def plan_points(arch: str, ks: Sequence[int], methods: Sequence[str], segments: Sequence[int] = (1,),
                recompute: str = "both", options: dict | None = None,
                variants: dict[str, dict] | None = None) -> list[dict]:
    """The points: plain BP first (the reference), then BP checkpointed with each of ``segments`` blocks per
    segment, then every local method at every K ≥ 2 (:func:`mlaan.bench.memory.plan_cases`), without and/or with
    ``grad_checkpointing`` (``recompute``, :func:`mlaan.bench.common.plan_variants`), every one with the engine
    ``options`` (a method that does not read one is built without it); then, for each of ``variants`` (label →
    engine options), the same points of the methods that read all of its options (:func:`methods_reading`), built
    with ``options`` and the variant's on top, ``"variant"`` set to its label. Each point is
    ``{"label", "method", "k", "options"}`` (and ``"variant"``); a point that builds what an earlier one builds is
    left out. ValueError when bp is not among ``methods``, or a variant has no method that reads it or adds no
    point of its own."""
    cases = [(arch, k) for k in ks if k >= 2]
    common.check_options(methods, dict(options or {}), cases=cases, set_by=SET_BY_FLAGS)
    points = _plan(arch, ks, methods, segments, recompute, dict(options or {}))
    if not any(common.is_reference(p) for p in points):
        raise ValueError("the frontier needs bp among --methods: every figure is relative to it")
    for name, extra in (variants or {}).items():
        readers = methods_reading(methods, extra)
        if not readers:
            raise ValueError(f"--variant {name}: no method of --methods ({', '.join(methods)}) reads "
                             f"{', '.join(sorted(extra))}")
        common.check_options(readers, {**(options or {}), **extra}, what=f"--variant {name}", cases=cases,
                             set_by=SET_BY_FLAGS)
        points.extend(_plan(arch, ks, readers, segments, recompute, {**(options or {}), **extra}, variant=name))
    points = _distinct(points)
    for name, extra in (variants or {}).items():
        if not any(p.get("variant") == name for p in points):
            settings = ",".join(f"{k}={common.option_text(v)}" for k, v in extra.items())
            raise ValueError(f"--variant {name}: every point it would add builds one already planned ({settings} "
                             "is the default, another variant's, or read only with a setting these points lack, "
                             "such as --grad-checkpointing on)")
    return points


def changed_options(options: dict) -> dict:
    """``options`` without those set to their default (``lam_trunk=copies``, ``checkpoint_trunk=all``): what makes
    a step other than the method's plain one."""
    defaults = LocalOptions()
    def is_default(name: str, value: object) -> bool:
        default = getattr(defaults, name, object())
        return value == default or (isinstance(default, tuple) and list(default) == value)
    return {name: value for name, value in options.items() if not is_default(name, value)}


def _distinct(points: list[dict]) -> list[dict]:
    """``points`` without those that build what an earlier one builds (the same method, K and options read, those
    at their default aside): a variant whose options a point does not read (``checkpoint_modules`` without
    recomputation) or sets to the default would time the same step twice under two names."""
    seen, kept = set(), []
    for point in points:
        options = changed_options(point["options"])
        key = (point["method"], point["k"], json.dumps(options, sort_keys=True, default=str))
        if key not in seen:
            seen.add(key)
            kept.append(point)
    return kept


def _plan(arch: str, ks: Sequence[int], methods: Sequence[str], segments: Sequence[int], recompute: str,
          options: dict, variant: str | None = None) -> list[dict]:
    points = []
    cases = memory.plan_cases({arch: list(ks)}, list(methods))
    for _, method, k, planned in common.plan_variants(cases, options, recompute):
        if common.end_to_end(method) and planned.get("grad_checkpointing"):
            settings = [{**planned, "checkpoint_segment": s} for s in segments]
        else:
            settings = [planned]
        for opts in settings:
            point = {"method": method, "k": common.model_k(method, k), "options": opts}
            if variant is not None:
                point["variant"] = variant
            points.append({"label": point_label(point), **point})
    return points


def point_label(point: dict) -> str:
    """The point's name (:func:`mlaan.bench.common.label`) with its variant's label after the method's name:
    ``dgl+mlaan twins +ckpt``."""
    plain = label(point)
    if not point.get("variant"):
        return plain
    return f"{point['method']} {point['variant']}{plain[len(point['method']):]}"


# ---------------------------------------------------------------------------------------------- measure
def measure_memory(arch: str, points: list[dict], batch: int, isolate: bool = True,
                   log: Callable[[str], None] = print) -> None:
    """Each point's accounted peak (``peak_bytes``, ``pct_of_bp``) and parameter counts (``trainable_params``;
    ``frozen_params``: the EMA twins), in place: one training step under the exact accountant, each point in a fresh
    process unless ``isolate`` is False."""
    for p in points:
        case = {"arch": arch, "method": p["method"], "k": p["k"], "batch": batch, "device": "cpu",
                "mode": "account", "steps": 1, "warmup": 0, "options": p["options"]}
        r = memory.measure_in_subprocess(case) if isolate else memory.measure_case(**case)
        if "error" in r:
            raise RuntimeError(f"memory of {p['label']} K={p['k']}: {r['error']}")
        p["peak_bytes"] = r["peak_bytes"]
        p["memory_breakdown"] = r.get("breakdown")
        p["trainable_params"], p["frozen_params"] = r.get("trainable_params"), r.get("frozen_params")
        log(f"  memory {p['label']} K={p['k']}: {runtime.format_bytes(r['peak_bytes'])}")
    results = [{"arch": arch, "batch": batch, **p} for p in points]
    memory.add_percentages(results)
    for p, r in zip(points, results):
        p["pct_of_bp"] = r["pct_of_bp"]


def measure_time(arch: str, points: list[dict], batch: int, fmt: str = "fp32+cl", warmup: int = 1,
                 repeats: int = 5, seed: int = 0, log: Callable[[str], None] = print) -> None:
    """Each point's median step time (``median_step_s``) and its ratio to plain BP's (``time_ratio``), in place:
    all points built up front and timed in one interleaved run in the numeric format ``fmt``
    (:data:`mlaan.bench.speed.FORMATS`)."""
    dtype, channels_last = speed.FORMATS[fmt]
    steps = {}
    for p in points:
        model, optimizer = common.build(arch, p["method"], p["k"], seed=seed, **p["options"])
        model.set_channels_last(channels_last)
        model.autocast_dtype = dtype
        images, targets = common.synthetic_batch(model, batch, seed=seed)
        steps[_key(p)] = (model, optimizer, images, targets)
    times, _, _ = speed.interleaved_times(steps, warmup, repeats, log)
    reference = next(p for p in points if common.is_reference(p))
    bp_time = statistics.median(times[_key(reference)])
    for p in points:
        p["step_times_s"] = times[_key(p)]
        p["median_step_s"] = statistics.median(times[_key(p)])
        p["time_ratio"] = p["median_step_s"] / bp_time


def _key(point: dict) -> str:
    return point["label"] if common.end_to_end(point["method"]) else f"{point['label']} K={point['k']}"


# --------------------------------------------------------------------------------------------- accuracy
def load_accuracy(path: Path, required: bool = False) -> dict | None:
    """An accuracy report (``mlaan bench accuracy``'s accuracy.json), None when there is none at ``path``, it is
    not JSON or not such a report; ValueError instead when ``required`` (a path the user named)."""
    try:
        report = json.loads(Path(path).read_text())
    except OSError as e:
        problem = f"cannot be read ({e.strerror or e})"
    except ValueError:
        problem = "is not JSON"
    else:
        if (isinstance(report, dict) and isinstance(report.get("recipe"), dict)
                and isinstance(report.get("summary"), list)):
            return report
        problem = "is not an accuracy report (no 'recipe' and 'summary')"
    if required:
        raise ValueError(f"--accuracy {path} {problem}: give the accuracy.json of `mlaan bench accuracy`, "
                         "or 'none'")
    return None


def annotate_accuracy(points: list[dict], arch: str, report: dict | None, source: str = "") -> None:
    """``test_error`` (mean over seeds, a fraction), ``test_error_std``, ``seeds`` and ``accuracy_source`` on each
    point whose setting the report has: same architecture, same K (any K for an end-to-end method), same method,
    and no engine option but recomputation's set off its default (recomputation changes no result): a point built
    with another option (``--option lam_trunk=twins``, a ``--variant`` of it) computes other steps. A report whose
    runs were given extra ``mlaan train`` flags (``--train-arg``) annotates nothing: they may have changed them."""
    if not report or (report.get("recipe") or {}).get("train_arg"):
        return
    recipe = report.get("recipe") or {}
    try:
        same_arch = bool(recipe.get("arch")) and common.check_arch(str(recipe["arch"])) == arch
    except ValueError:  # a report of an architecture this installation does not have
        same_arch = False
    if not same_arch:
        return
    by_method = {}
    for s in report.get("summary", []):
        if not s.get("variant") and s.get("mean") is not None:
            by_method[s["method"]] = s
    where = f"{recipe.get('dataset', '?')}, {recipe.get('epochs', '?')} epochs" + (f", {source}" if source else "")
    for p in points:
        s = by_method.get(p["method"])
        other_steps = not set(changed_options(p["options"])) <= RECOMPUTE_OPTIONS
        if s is None or other_steps or (not common.end_to_end(p["method"]) and recipe.get("k") != p["k"]):
            continue
        p["test_error"] = s["mean"]
        p["test_error_std"] = s.get("std")
        p["seeds"] = list(s.get("seeds", []))
        p["accuracy_source"] = where
        if any(p["options"].get(o) for o in RECOMPUTE_OPTIONS):
            p["accuracy_note"] = f"= {p['method']}'s: recomputation changes no result"


# ----------------------------------------------------------------------------------------------- Pareto
def pareto(points: Sequence[dict], keys: Sequence[str]) -> list[bool]:
    """For each point, whether no other point is at least as good in every one of ``keys`` (smaller is better)
    and strictly better in one; a point missing a key is never on the set."""
    def ok(p: dict) -> bool:
        return all(p.get(k) is not None for k in keys)

    marks = []
    for p in points:
        if not ok(p):
            marks.append(False)
            continue
        dominated = any(ok(q) and q is not p and all(q[k] <= p[k] for k in keys) and any(q[k] < p[k] for k in keys)
                        for q in points)
        marks.append(not dominated)
    return marks


def mark_pareto(points: list[dict]) -> None:
    """``pareto`` (memory and time) and ``pareto_with_error`` (memory, time and test error, among the points
    with an error) on each point, in place."""
    for p, on in zip(points, pareto(points, ("pct_of_bp", "time_ratio"))):
        p["pareto"] = on
    for p, on in zip(points, pareto(points, ("pct_of_bp", "time_ratio", "test_error"))):
        p["pareto_with_error"] = on


# ----------------------------------------------------------------------------------------------- output
def render(result: dict) -> str:
    points = sorted(result["points"], key=lambda p: (p.get("pct_of_bp") or 0, p.get("time_ratio") or 0))
    rows = []
    for p in points:
        err = "—"
        if p.get("test_error") is not None:
            std = p.get("test_error_std")
            err = f"{100 * p['test_error']:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "") + (
                f" ({len(p['seeds'])} seed{'s' if len(p['seeds']) != 1 else ''})")
        rows.append([
            p["label"],
            p["k"],
            runtime.format_bytes(p.get("peak_bytes")),
            "—" if p.get("pct_of_bp") is None else f"{p['pct_of_bp']:.1f}%",
            "—" if p.get("median_step_s") is None else f"{1000 * p['median_step_s']:.0f}",
            "—" if p.get("time_ratio") is None else f"{p['time_ratio']:.2f}×",
            "**yes**" if p.get("pareto") else "",
            err,
            "**yes**" if p.get("pareto_with_error") else "",
        ])
    source = next((p["accuracy_source"] for p in points if p.get("accuracy_source")), None)
    head = (f"{result['arch']}: peak memory at batch {result['batch']} (exact accounting, one SGD step), step time "
            f"at batch {result['time_batch']} ({result['format']}, median of {result['repeats']} interleaved rounds "
            f"after {result['warmup']} warm-up, {runtime.plural(result['threads'], 'thread')}"
            + (f", load average {result['loadavg_after'][0]:.1f} after" if result.get("loadavg_after") else "")
            + f"); machine: {result['machine']}")
    if result.get("options"):  # every point was built with them (those of its method that it reads)
        head += "\n\nEngine options of every point (--option): " + common.options_text(result["options"])
    table = common.format_table(
        ["setting", "K", "peak", "% of BP", "step ms", "time × BP", "Pareto (memory, time)", "test error %",
         "Pareto (+ error)"], rows)
    notes = "Pareto: no other point needs less memory and less time (one strictly). " + (
        f"Test error from the accuracy report ({source}), mean ± std over seeds; a recomputing setting has its "
        "plain method's (bit-identical steps)." if source else "No accuracy report of this architecture and K.")
    return f"{head}\n\n{table}\n\n{notes}"


def plot(result: dict, path: Path) -> None:
    """Step time × BP (x) against peak memory % of BP (y), a marker per point, the Pareto set joined."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(9, 6))
    points = result["points"]
    variants = list(dict.fromkeys(p["variant"] for p in points if p.get("variant")))
    for i, p in enumerate(points):
        method = p["method"]
        recomputed = bool(p["options"].get("grad_checkpointing"))
        marker = ("D" if recomputed else "s") if common.end_to_end(method) else ("^" if recomputed else "o")
        # a variant's points in a colour of their own (the fallback palette), apart from their plain method's
        color = (common.method_color(f"{method} {p['variant']}", variants.index(p["variant"]))
                 if p.get("variant") else common.method_color(method, i))
        ax.scatter(p["time_ratio"], p["pct_of_bp"], marker=marker, s=70, color=color,
                   edgecolors="red" if p.get("pareto") else "white", linewidths=1.8, zorder=3)
        text = p["label"] + ("" if common.end_to_end(method) else f" K={p['k']}")
        if p.get("test_error") is not None:
            text += f"\n{100 * p['test_error']:.2f}% err"
        ax.annotate(text, (p["time_ratio"], p["pct_of_bp"]), textcoords="offset points", xytext=(6, 4),
                    fontsize=7)
    front = sorted((p for p in points if p.get("pareto")), key=lambda p: p["time_ratio"])
    if len(front) > 1:
        ax.step([p["time_ratio"] for p in front], [p["pct_of_bp"] for p in front], where="post", color="grey",
                linestyle="--", linewidth=1, zorder=2, label="Pareto set (memory, time)")
    with_error = [p for p in points if p.get("pareto_with_error")]
    if with_error:
        ax.scatter([p["time_ratio"] for p in with_error], [p["pct_of_bp"] for p in with_error], s=260,
                   facecolors="none", edgecolors="grey", linewidths=1.2, zorder=2,
                   label="Pareto set with test error (memory, time, error)")
    if ax.lines or with_error:
        ax.legend(fontsize=8)
    ax.axhline(100, color="black", linewidth=0.6, linestyle=":")
    ax.axvline(1, color="black", linewidth=0.6, linestyle=":")
    ax.set_xlabel(f"step time × BP (batch {result['time_batch']}, {result['format']})")
    ax.set_ylabel(f"peak training memory, % of BP (batch {result['batch']}, exact accounting)")
    ax.set_title(f"{result['arch']}: memory–time frontier (square: BP, diamond: checkpointed BP, triangle: "
                 f"recomputed local method, red edge: Pareto)", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    common.save_figure(fig, path)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), with its widest vector extension and its bf16 instructions (a
    virtual machine's name may say no more than "Intel(R) Xeon(R) Processor"): what a time was measured on."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    vector = next((v for f, v in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if f in flags), None)
    return ", ".join(x for x in (name, vector, runtime.cpu_bf16()) if x)


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="resnet32", help="architecture")
    p.add_argument("--ks", default="4,16", help="K values of the local methods (BP: K=1)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated methods (bp is the reference)")
    p.add_argument("--segments", default="1,2,4",
                   help="BP checkpointed with this many blocks per segment (checkpoint_segment), each a point")
    p.add_argument("--grad-checkpointing", default="both", choices=RECOMPUTE_CHOICES,
                   help="methods with something to recompute: points without grad_checkpointing, with it, or both")
    p.add_argument("--batch", type=int, default=32, help="batch of the memory accounting")
    p.add_argument("--time-batch", type=int, default=None, help="batch of the timed steps (default: --batch)")
    p.add_argument("--format", default="fp32+cl", choices=tuple(speed.FORMATS),
                   help="numeric format of the timed steps (cl: channels-last); memory is accounted in fp32")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per point before timing")
    p.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds (the median is reported)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads, here and in each memory process (default: the idle cores)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="engine option for every method that reads it, e.g. checkpoint_modules=8 (repeatable)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=KEY=VALUE[,KEY=VALUE]",
                   help="extra points, beside the plain ones in the same timing run, of every method that reads "
                        "all these options, built with them and named with LABEL (e.g. twins=lam_trunk=twins: "
                        "'dgl+mlaan twins'; repeatable)")
    p.add_argument("--accuracy", default=str(DEFAULT_ACCURACY), metavar="JSON",
                   help="accuracy report whose test errors annotate the points of the same arch, K and method "
                        "('none': no annotation)")
    p.add_argument("--no-isolate", action="store_true", help="account every point in this process")
    p.add_argument("--output-dir", default=None, help="(default: runs/bench-frontier)")


def run(args: argparse.Namespace) -> int:
    arch = common.check_arch(args.arch)
    ks = common.parse_ints(args.ks, "--ks")
    bad = [k for k in ks if k > max_local_modules(arch)]
    if bad:
        raise ValueError(f"--ks: K={bad[0]} is too large for {arch} (allowed 1 to {max_local_modules(arch)})")
    methods = common.parse_methods(args.methods)
    segments = common.parse_ints(args.segments, "--segments")
    time_batch = args.time_batch or args.batch
    for name, value in (("--batch", args.batch), ("--time-batch", time_batch), ("--repeats", args.repeats)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be non-negative, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    report = None
    if args.accuracy.lower() != "none":  # read before measuring: a path given by hand must be a report
        report = load_accuracy(Path(args.accuracy), required=args.accuracy != str(DEFAULT_ACCURACY))
    options = memory.parse_options(args.option)
    points = plan_points(arch, ks, methods, segments, args.grad_checkpointing, options, parse_variants(args.variant))
    runtime.apply_threads(runtime.choose_threads(args.threads))
    out = common.output_dir(args.output_dir, "frontier")
    machine = f"{cpu_name()}; " + common.machine_description() + f"; code {common.code_version()}"
    result = {"machine": machine, "arch": arch, "batch": args.batch, "time_batch": time_batch,
              "format": args.format, "warmup": args.warmup, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "options": options, "points": points}
    print(f"mlaan bench frontier on {machine}: {arch}, {len(points)} points", flush=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    measure_memory(arch, points, args.batch, isolate=not args.no_isolate, log=log)
    common.write_json(out / "frontier.json", result)
    measure_time(arch, points, time_batch, args.format, args.warmup, args.repeats, log=log)
    if report is not None:
        annotate_accuracy(points, arch, report, source=args.accuracy)
    mark_pareto(points)
    result["loadavg_after"] = list(os.getloadavg())  # other jobs on the machine slow every point alike
    common.write_outputs(out, "frontier", render(result), result, lambda path: plot(result, path))
    return 0
