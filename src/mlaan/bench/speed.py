"""`mlaan bench speed`: step time of each method relative to BP, beside each method's FLOP floor.

All models of one (architecture, K) are built up front and timed in one process, interleaved: every round
times one full training step of every method (zero_grad, ``train_step``, ``optimizer.step``,
``after_optimizer_step``), the order rotating from round to round, so that a load change on the machine hits
all methods alike. The figure is the median over the rounds, after warm-up steps. The garbage collector is
run before and disabled during each timed step.

``--breakdown METHOD`` also times where one method's step goes (backbone forward, aux nets, the cascade's
input-gradient passes, weight backwards, optimizer, EMA) by wrapping the engine's step functions on that
model instance, and puts each part's achieved GFLOP/s beside it, plus a torch.profiler table of the top ops.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

import mlaan
from mlaan.engine import parse_method

from .. import runtime
from ..training.loop import optimizer_step
from . import common
from .common import RECOMPUTE_CHOICES, label, plan_variants
from .flops import step_flops

DEFAULT_CASES = "resnet32:16,resnet110:55"


def parse_cases(text: str) -> list[tuple[str, int]]:
    """``"resnet32:16,resnet110:55"`` → [("resnet32", 16), ("resnet110", 55)], K checked against the net."""
    cases = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        arch, sep, k_text = item.partition(":")
        if not sep:
            raise ValueError(f"case {item!r} must be ARCH:K, e.g. resnet32:16")
        common.check_arch(arch)
        (k,) = common.parse_ints(k_text, f"K of case {item!r}")
        limit = common.max_modules(arch)
        if k > limit:
            raise ValueError(f"case {item!r}: K={k} is too large for {arch} (allowed 1 to {limit})")
        cases.append((arch, k))
    if not cases:
        raise ValueError("no ARCH:K case given")
    return cases


def _timed_step(model, optimizer, images, targets) -> tuple[float, float, float]:
    """Wall seconds of one full step, of its ``train_step`` part, and the CPU seconds of the whole step (all
    threads of this process: less sensitive than wall time to other processes on the machine)."""
    gc.collect()
    gc.disable()
    try:
        c0 = time.process_time()
        t0 = time.perf_counter()
        train_step_end: list[float] = []
        optimizer_step(model, optimizer, images, targets, after_train_step=lambda: train_step_end.append(
            time.perf_counter()))
        t1 = train_step_end[0]
        t2 = time.perf_counter()
        c2 = time.process_time()
    finally:
        gc.enable()
    return t2 - t0, t1 - t0, c2 - c0


# Numeric formats a step can run in: autocast dtype and memory format (``--formats``).
FORMATS = {
    "fp32": (None, False),
    "fp32+cl": (None, True),
    "bf16": (torch.bfloat16, False),
    "bf16+cl": (torch.bfloat16, True),
}
DEFAULT_FORMATS = "fp32,fp32+cl,bf16+cl"


def parse_formats(text: str) -> list[str]:
    """``"fp32,bf16+cl"`` → ["fp32", "bf16+cl"], each one of :data:`FORMATS`."""
    names = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in names if f not in FORMATS]
    if unknown or not names:
        raise ValueError(f"unknown format(s) {', '.join(unknown) or '(none)'}; allowed: {', '.join(FORMATS)}")
    return list(dict.fromkeys(names))


def _with_format(name: str, fmt: str, first: str) -> str:
    return name if fmt == first else f"{name} [{fmt}]"


def bench_case(
    arch: str,
    k: int,
    methods: list[str],
    batch: int = 128,
    warmup: int = 2,
    repeats: int = 7,
    seed: int = 0,
    log: Callable[[str], None] = print,
    recompute: str = "off",
    formats: list[str] | None = None,
) -> dict:
    """Interleaved step times and FLOPs of ``methods`` on ``arch`` with K local modules (BP: K=1).

    ``recompute`` ("off", "on", "both") times methods with something to recompute without and/or with
    ``grad_checkpointing``; those rows are named ``METHOD +ckpt``. ``formats`` (keys of :data:`FORMATS`, the
    first being the reference) times each method in each numeric format, rows named ``METHOD [bf16+cl]``; every
    ratio is to BP in the first format, ``vs_first_format`` to the same method in the first format."""
    formats = formats or ["fp32"]
    bp = next(m for m in mlaan.available_methods() if parse_method(m).base.end_to_end)
    if not any(parse_method(m).base.end_to_end for m in methods):
        methods = [bp, *methods]
    models = {}
    names = {}
    for _, m, _, options in plan_variants([(arch, m, k) for m in methods], {}, recompute):
        base_name = label({"method": m, "options": options})
        flops = None
        for fmt in formats:
            dtype, channels_last = FORMATS[fmt]
            model, optimizer = common.build(arch, m, k, seed=seed, **options)
            model.set_channels_last(channels_last)
            model.autocast_dtype = dtype
            images, targets = common.synthetic_batch(model, batch, seed=seed)
            flops = flops or step_flops(model, images, targets)  # the same in every format
            name = _with_format(base_name, fmt, formats[0])
            models[name] = (model, optimizer, images, targets, flops)
            names[name] = (m, base_name, fmt)
        log(f"  built {arch} {base_name} (K={common.model_k(m, k)}) in {', '.join(formats)}: "
            f"{flops['measured'] / 1e9:.1f} GFLOP/step measured")
    methods = list(models)
    for m in methods:
        for _ in range(warmup):
            _timed_step(*models[m][:4])
    times: dict[str, list[float]] = defaultdict(list)
    step_only: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    for r in range(repeats):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for m in order:
            total, train_part, cpu_s = _timed_step(*models[m][:4])
            times[m].append(total)
            step_only[m].append(train_part)
            cpu[m].append(cpu_s)
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in methods))
    bp_time = statistics.median(times[bp])
    bp_cpu = statistics.median(cpu[bp])
    bp_flops = models[bp][4]
    rows = []
    for m in methods:
        f = models[m][4]
        med = statistics.median(times[m])
        ratio = med / bp_time
        floor_ratio = f["floor"] / bp_flops["floor"]
        exact_ratio = f["exact_floor"] / bp_flops["floor"]
        method, base_name, fmt = names[m]
        rows.append(
            {
                "method": m,
                "format": fmt,
                "vs_first_format": med / statistics.median(times[base_name]),
                "grad_checkpointing": base_name != method,
                "k": common.model_k(method, k),
                "median_step_s": med,
                "median_train_step_s": statistics.median(step_only[m]),
                "step_times_s": times[m],
                "median_cpu_s": statistics.median(cpu[m]),
                "cpu_times_s": cpu[m],
                "cpu_ratio": statistics.median(cpu[m]) / bp_cpu,
                "time_ratio": ratio,
                "flops_measured": f["measured"],
                "flops_floor": f["floor"],
                "flops_exact_floor": f["exact_floor"],
                "measured_flop_ratio": f["measured"] / bp_flops["floor"],
                "floor_ratio": floor_ratio,
                "exact_floor_ratio": exact_ratio,
                "time_over_floor": ratio / floor_ratio,
                "time_over_exact_floor": ratio / exact_ratio,
                "flop_parts": f["parts"],
                "gflops_per_s": f["measured"] / med / 1e9,
            }
        )
    return {"arch": arch, "k": k, "batch": batch, "warmup": warmup, "repeats": repeats, "methods": rows,
            "formats": formats, "threads": torch.get_num_threads(), "loadavg_after": os.getloadavg()}



# ------------------------------------------------------------------------------------------- breakdown
class _ExclusiveTimer:
    """Nested wall-clock timing where a part's time excludes the parts timed inside it."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []

    def wrap(self, fn: Callable, label: str | Callable[..., str]) -> Callable:
        def wrapped(*args, **kwargs):
            name = label(*args, **kwargs) if callable(label) else label
            self._stack.append([name, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                name, start, children = self._stack.pop()
                elapsed = time.perf_counter() - start
                self.totals[name] += elapsed - children
                if self._stack:
                    self._stack[-1][2] += elapsed

        return wrapped


def _instrument(model: mlaan.LocalModel, optimizer: torch.optim.Optimizer, timer: _ExclusiveTimer) -> None:
    """Wrap the engine's step functions of this model *instance* (the engine's code is untouched)."""
    independent = {id(h) for h in model.independent_heads}

    def head_kind(head: nn.Module, *args, **kwargs) -> str:
        return "aux independent" if id(head) in independent else "aux cascade"

    for module in model.local_modules:
        module.forward = timer.wrap(module.forward, "backbone forward")
    for kind, heads in (("aux independent", model.independent_heads), ("aux cascade", model.cascade_heads.values())):
        for head in heads:
            trunk = getattr(head, "trunk", None)
            if trunk is not None:
                trunk.forward = timer.wrap(trunk.forward, f"{kind}: LAM/AugLocal trunk forward")
                head.head.forward = timer.wrap(head.head.forward, f"{kind}: head forward")
            else:
                head.forward = timer.wrap(head.forward, f"{kind}: head forward")
    model._head_gradient = timer.wrap(model._head_gradient, lambda head, *a, **k: f"{head_kind(head)}: backward")
    model._propagate_cascade = timer.wrap(model._propagate_cascade, "cascade input-gradient passes")
    model._finish_module = timer.wrap(model._finish_module, "backbone weight backward")
    model.train_step = timer.wrap(model.train_step, "other (last module's loss, bookkeeping)")
    optimizer.step = timer.wrap(optimizer.step, "optimizer step")
    optimizer.zero_grad = timer.wrap(optimizer.zero_grad, "zero_grad")
    model.after_optimizer_step = timer.wrap(model.after_optimizer_step, "EMA twin update")


# which FLOP parts (see flops.floor_step_flops) each timed part executes
_PART_FLOPS = {
    "backbone forward": ("backbone_forward",),
    "aux independent: head forward": ("aux_independent_forward",),
    "aux independent: LAM/AugLocal trunk forward": (),
    "aux cascade: head forward": ("aux_cascade_forward",),
    "aux cascade: LAM/AugLocal trunk forward": (),
    "aux independent: backward": ("aux_independent_backward",),
    "aux cascade: backward": ("aux_cascade_backward",),
}


def breakdown(
    arch: str, k: int, method: str, batch: int = 128, steps: int = 3, seed: int = 0, trace_dir: Path | None = None
) -> dict:
    """Where one method's step time goes, with achieved GFLOP/s per part, and the profiler's top ops."""
    model, optimizer = common.build(arch, method, k, seed=seed)
    images, targets = common.synthetic_batch(model, batch, seed=seed)
    flops = step_flops(model, images, targets)
    for _ in range(2):
        common.training_step(model, optimizer, images, targets)
    timer = _ExclusiveTimer()
    _instrument(model, optimizer, timer)
    for _ in range(steps):
        gc.collect()
        common.training_step(model, optimizer, images, targets)
    parts = {name: t / steps for name, t in timer.totals.items()}
    total = sum(parts.values())
    fparts = flops["parts"]
    rows = []
    for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        rows.append({"part": name, "seconds": seconds, "share": seconds / total})
    # The forward of an aux net is timed as trunk + head; its FLOPs are reported on the sum.
    table_flops = {
        "backbone forward": fparts.get("backbone_forward", 0),
        "backbone backward (weight passes + cascade input passes)": fparts.get("backbone_backward", 0)
        + fparts.get("cascade_extra_input_grad", 0),
        "aux independent forward": fparts.get("aux_independent_forward", 0),
        "aux independent backward": fparts.get("aux_independent_backward", 0),
        "aux cascade forward": fparts.get("aux_cascade_forward", 0),
        "aux cascade backward": fparts.get("aux_cascade_backward", 0),
    }
    time_groups = {
        "backbone forward": parts.get("backbone forward", 0.0),
        "backbone backward (weight passes + cascade input passes)": parts.get("backbone weight backward", 0.0)
        + parts.get("cascade input-gradient passes", 0.0),
        "aux independent forward": parts.get("aux independent: head forward", 0.0)
        + parts.get("aux independent: LAM/AugLocal trunk forward", 0.0),
        "aux independent backward": parts.get("aux independent: backward", 0.0),
        "aux cascade forward": parts.get("aux cascade: head forward", 0.0)
        + parts.get("aux cascade: LAM/AugLocal trunk forward", 0.0),
        "aux cascade backward": parts.get("aux cascade: backward", 0.0),
    }
    groups = [
        {
            "group": g,
            "seconds": time_groups[g],
            "gflop": table_flops[g] / 1e9,
            "gflops_per_s": (table_flops[g] / time_groups[g] / 1e9) if time_groups[g] > 0 else None,
        }
        for g in time_groups
    ]
    top_ops = _profile_top_ops(model, optimizer, images, targets, trace_dir)
    return {
        "arch": arch,
        "k": k,
        "method": method,
        "batch": batch,
        "steps": steps,
        "step_s": total,
        "parts": rows,
        "groups": groups,
        "top_ops": top_ops,
    }


def _profile_top_ops(model, optimizer, images, targets, trace_dir: Path | None, limit: int = 20) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        common.training_step(model, optimizer, images, targets)
    if trace_dir is not None:
        prof.export_chrome_trace(str(trace_dir / "breakdown_trace.json"))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=limit)


# --------------------------------------------------------------------------------------------- output
def render(results: list[dict]) -> str:
    out = []
    for case in results:
        rows = []
        for r in case["methods"]:
            rows.append(
                [
                    r["method"],
                    r["k"],
                    f"{r['median_step_s'] * 1000:.0f}",
                    f"{r['time_ratio']:.2f}×",
                    f"{r.get('vs_first_format', 1.0):.2f}×",
                    f"{r['cpu_ratio']:.2f}×",
                    f"{r['measured_flop_ratio']:.2f}×",
                    f"{r['floor_ratio']:.2f}×",
                    f"{r['exact_floor_ratio']:.2f}×",
                    f"{r['time_over_floor']:.2f}",
                    f"{r['time_over_exact_floor']:.2f}",
                    f"{r['gflops_per_s']:.1f}",
                ]
            )
        formats = case.get("formats", ["fp32"])
        load = f", {case['load']} busy process(es) beside it" if case.get("load") else ""
        out.append(
            f"{case['arch']}, K={case['k']}, batch {case['batch']}, {case.get('threads', '?')} thread(s){load}: "
            f"median of {case['repeats']} interleaved steps after {case['warmup']} warm-up; ratios to BP in "
            f"{formats[0]}\n"
            + common.format_table(
                [
                    "method",
                    "K",
                    "step ms",
                    "time / BP",
                    f"time / same in {formats[0]}",
                    "CPU time / BP",
                    "FLOPs run / BP",
                    "FLOP floor / BP",
                    "exact floor / BP",
                    "time ÷ floor",
                    "time ÷ exact floor",
                    "GFLOP/s",
                ],
                rows,
            )
        )
    return "\n\n".join(out)


def render_breakdown(b: dict) -> str:
    rows = [[p["part"], f"{p['seconds'] * 1000:.0f}", f"{p['share'] * 100:.1f}%"] for p in b["parts"]]
    groups = [
        [
            g["group"],
            f"{g['seconds'] * 1000:.0f}",
            f"{g['gflop']:.2f}",
            "—" if g["gflops_per_s"] is None else f"{g['gflops_per_s']:.1f}",
        ]
        for g in b["groups"]
    ]
    return (
        f"Breakdown of a {b['method']} step ({b['arch']}, K={b['k']}, batch {b['batch']}, mean of {b['steps']} "
        f"instrumented steps, {b['step_s'] * 1000:.0f} ms/step)\n"
        + common.format_table(["part (exclusive time)", "ms/step", "share"], rows)
        + "\n\n"
        + common.format_table(["group", "ms/step", "GFLOP (floor)", "GFLOP/s"], groups)
        + "\n\ntorch.profiler, top ops by self CPU time (one step):\n"
        + b["top_ops"]
    )


def plot(results: list[dict], path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, case in zip(axes[0], results):
        rows = case["methods"]
        xs = range(len(rows))
        colors = [common.method_color(r["method"].split(" ")[0], i) for i, r in enumerate(rows)]
        hatches = ["" if r.get("format", "fp32") == case.get("formats", ["fp32"])[0] else "//" for r in rows]
        ax.bar(xs, [r["time_ratio"] for r in rows], color=colors, hatch=hatches, label="measured step time")
        # black and grey markers: no method's bar colour, so a marker never vanishes into its bar
        ax.scatter(xs, [r["exact_floor_ratio"] for r in rows], marker="_", s=600, color="black", zorder=3,
                   linewidths=3, label="exact FLOP floor")
        ax.scatter(xs, [r["floor_ratio"] for r in rows], marker="x", s=60, color="#555555", zorder=4,
                   linewidths=1.5, label="FLOP floor (one backward)")
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["method"] for r in rows], rotation=35, ha="right")
        ax.set_ylabel("step time relative to BP (×)")
        ax.set_title(f"{case['arch']}, K={case['k']}, batch {case['batch']}")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[None]:
    """``n`` single-threaded busy-loop processes at this process's priority while inside: another job of the
    user's. (A niced one barely slows a step: the scheduler gives its core back to us.)"""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        if procs:
            time.sleep(1.0)  # let them be scheduled, so the idle-core count sees them
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", default=DEFAULT_CASES, help="ARCH:K list")
    p.add_argument("--methods", default=",".join(common.DEFAULT_METHODS), help="comma-separated methods")
    p.add_argument("--batch", type=int, default=128, help="images per timed step (synthetic, CIFAR-shaped)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method before timing")
    p.add_argument("--repeats", type=int, default=7, help="timed interleaved rounds (the median is reported)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the idle cores, as `mlaan train` chooses them)")
    p.add_argument("--formats", default=DEFAULT_FORMATS,
                   help=f"numeric formats to time each method in, the first is the reference; from "
                        f"{', '.join(FORMATS)} (cl: channels-last memory format)")
    p.add_argument("--load", type=int, default=0, metavar="N",
                   help="run N busy single-threaded processes (same priority) beside the benchmark, to show how "
                        "a busy core slows a step (threads are chosen after they start)")
    p.add_argument("--breakdown", default="dgl+mlaan", metavar="METHOD",
                   help="also time where this method's step goes, on the first case ('none' to skip)")
    p.add_argument("--grad-checkpointing", default="off", choices=RECOMPUTE_CHOICES,
                   help="methods with something to recompute (LAM, MLM, AugLocal): time them as configured by "
                        "default (off), with grad_checkpointing (on, rows named +ckpt), or both")
    p.add_argument("--seed", type=int, default=0, help="seed of the models' weights and the synthetic batch")
    p.add_argument("--output-dir", default=None, help="(default: runs/bench-speed)")


def run(args: argparse.Namespace) -> int:
    cases = parse_cases(args.cases)
    methods = common.parse_methods(args.methods)
    for name, value in (("--batch", args.batch), ("--repeats", args.repeats)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be non-negative, got {args.warmup}")
    breakdown_method = None if args.breakdown.lower() == "none" else common.parse_methods(args.breakdown)[0]
    formats = parse_formats(args.formats)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.load < 0:
        raise ValueError(f"--load must be non-negative, got {args.load}")
    out = common.output_dir(args.output_dir, "speed")
    with busy_processes(args.load):
        runtime.apply_threads(runtime.choose_threads(args.threads))
        machine = common.machine_description() + f"; code {common.code_version()}"
        bf16 = runtime.cpu_bf16()
        print(f"mlaan bench speed on {machine}, CPU bf16: {bf16 or 'none'} (load average "
              f"{os.getloadavg()[0]:.1f}, {args.load} busy process(es) started beside it)", flush=True)
        results = []
        for arch, k in cases:
            print(f"{arch} K={k}:", flush=True)
            case = bench_case(arch, k, methods, args.batch, args.warmup, args.repeats, args.seed,
                              log=lambda s: print(s, flush=True), recompute=args.grad_checkpointing,
                              formats=formats)
            results.append(case | {"load": args.load, "cpu_bf16": bf16})
            common.write_json(out / "speed.json", {"machine": machine, "cases": results})
    table = render(results)
    print("\n" + table, flush=True)
    (out / "speed.md").write_text(table + "\n")
    plot(results, out / "speed.png")
    data = {"machine": machine, "cases": results}
    if breakdown_method is not None:
        arch, k = cases[0]
        b = breakdown(arch, k, breakdown_method, args.batch, steps=max(3, min(args.repeats, 5)), seed=args.seed,
                      trace_dir=out)
        text = render_breakdown(b)
        print("\n" + text, flush=True)
        (out / "breakdown.md").write_text(text + "\n")
        data["breakdown"] = b
    common.write_json(out / "speed.json", data)
    print(f"\nwrote {out / 'speed.json'}, {out / 'speed.md'}, {out / 'speed.png'}", flush=True)
    return 0
