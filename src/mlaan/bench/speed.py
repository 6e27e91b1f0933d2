"""`mlaan bench speed`: step time of each method relative to BP, beside each method's FLOP floor.

All models of one (architecture, K) are built up front and timed in one process, interleaved: every round
times one full training step of every method (zero_grad, ``train_step``, ``optimizer.step``,
``after_optimizer_step``), the order rotating from round to round, so that a load change on the machine hits
all methods alike. The figure is the median over the rounds, after warm-up steps. The garbage collector is
run before and disabled during each timed step.

``--breakdown METHOD`` also times where one method's step goes (backbone forward, aux nets, the cascade's
input-gradient passes, weight backwards, optimizer, EMA) from a ``torch.profiler`` profile of a few more steps,
read by the phase markers the engine sets (:mod:`mlaan.engine.phases`), and puts each part's achieved GFLOP/s
beside it, plus the profiler's table of the top ops. Those steps are separate from the timed ones, and their
unprofiled time is reported beside (the profiler slows a step).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

import mlaan
from mlaan.engine import phases

from .. import runtime
from ..training.loop import optimizer_step
from ..training.safety import signal_when_parent_dies
from . import common
from .common import RECOMPUTE_CHOICES, label, plan_variants
from .flops import step_flops

DEFAULT_CASES = "resnet32:16,resnet110:55"


def parse_cases(text: str) -> list[tuple[str, int]]:
    """``"resnet32:16,resnet110:55"`` → [("resnet32", 16), ("resnet110", 55)], K checked against the net.

    K is what follows the last colon, so library architectures work too: ``"torchvision:resnet18:4"``.
    Raises ValueError (one line) for a case without K, an unknown architecture or a K out of range."""
    cases = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        arch, sep, k_text = item.rpartition(":")
        if not sep or not k_text.strip().lstrip("-").isdigit():
            raise ValueError(f"case {item!r} must be ARCH:K, e.g. resnet32:16 or torchvision:resnet18:4")
        arch = common.check_arch(arch)
        (k,) = common.parse_ints(k_text, f"K of case {item!r}")
        limit = mlaan.models.max_local_modules(arch)
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


def interleaved_times(
    steps: dict[str, tuple], warmup: int, repeats: int, log: Callable[[str], None] = print
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
    """Time one full training step of each entry, ``name -> (model, optimizer, images, targets)``: ``warmup``
    untimed steps each, then ``repeats`` rounds that time every entry once, the order rotating from round to
    round (a load change on the machine hits all alike). Returns the wall seconds of each step, of its
    ``train_step`` part and its CPU seconds, per name (:func:`_timed_step`)."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            _timed_step(*steps[name])
    times: dict[str, list[float]] = defaultdict(list)
    step_only: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            total, train_part, cpu_s = _timed_step(*steps[name])
            times[name].append(total)
            step_only[name].append(train_part)
            cpu[name].append(cpu_s)
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names))
    return times, step_only, cpu


# Numeric formats a step can run in: autocast dtype and memory format (``--formats``).
FORMATS = {
    "fp32": (None, False),
    "fp32+cl": (None, True),
    "bf16": (torch.bfloat16, False),
    "bf16+cl": (torch.bfloat16, True),
}
FP32_FORMATS = ["fp32", "fp32+cl"]


def default_formats() -> tuple[list[str], str]:
    """The formats ``bench speed`` times when ``--formats`` is not given, chosen from the running CPU's flags, and
    why (one line): fp32 and fp32+cl everywhere, and bf16+cl where the CPU has bf16 instructions (AVX512-BF16 or
    AMX-BF16). Without them bf16 is emulated: measured 8.4× (BP) and 12.9× (dgl+mlaan) slower than fp32 on an
    AMD EPYC with AVX2 only, which would turn the default benchmark into hours."""
    bf16 = runtime.cpu_bf16()
    if bf16 is None:
        return list(FP32_FORMATS), "bf16 not timed: this CPU has neither AVX512-BF16 nor AMX-BF16 (--formats adds it)"
    return [*FP32_FORMATS, "bf16+cl"], f"bf16 timed: the CPU has {bf16}"


def emulated_bf16_warning(formats: list[str]) -> str | None:
    """A warning line when ``formats`` asks for bf16 on a CPU without bf16 instructions (None otherwise)."""
    asked = [f for f in formats if FORMATS[f][0] == torch.bfloat16]
    if asked and runtime.cpu_bf16() is None:
        return (f"mlaan: warning: --formats {','.join(asked)} on a CPU without AVX512-BF16 or AMX-BF16: bf16 is "
                f"emulated there (measured 8-13x slower than fp32); its rows time the emulation")
    return None


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
    bp = next(m for m in mlaan.available_methods() if common.end_to_end(m))
    if not any(common.end_to_end(m) for m in methods):
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
    times, step_only, cpu = interleaved_times({m: models[m][:4] for m in methods}, warmup, repeats, log)
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
STEP_MARKER = "mlaan.bench.step"  # the benchmark's own marker around each profiled step
OTHER = "other (last module's loss, bookkeeping)"
_AUX_KIND = {phases.AUX_LOSS["independent"]: "aux independent", phases.AUX_LOSS["cascaded"]: "aux cascade"}
_PARTS = {
    phases.MODULE_FORWARD: "backbone forward",
    phases.CASCADE_BACKWARD: "cascade input-gradient passes",
    phases.MODULE_BACKWARD: "backbone weight backward",
    phases.OUTPUT_LOSS: OTHER,
    phases.EMA_UPDATE: "EMA twin update",
    STEP_MARKER: OTHER,
}
_AUX_PARTS = {phases.AUX_TRUNK_FORWARD: "LAM/AugLocal trunk forward", phases.AUX_FORWARD: "head forward"}
# torch's own markers of the optimizer (``torch.optim.Optimizer`` profiles step and zero_grad), by prefix
_TORCH_PARTS = {"Optimizer.step#": "optimizer step", "Optimizer.zero_grad#": "zero_grad"}
# how deep each marker nests, to order markers that start at the same instant
_DEPTH = {STEP_MARKER: 0, **dict.fromkeys(_AUX_KIND, 1), phases.AUX_FORWARD: 2, phases.AUX_TRUNK_FORWARD: 3}


def _marker(name: str) -> bool:
    return name in phases.STEP_PHASES or name == STEP_MARKER or name.startswith(tuple(_TORCH_PARTS))


def part_of(path: tuple[str, ...]) -> str:
    """The breakdown part a marker's exclusive time goes to, given the markers around it (outermost first, the
    marker itself last): the engine's phases (:mod:`mlaan.engine.phases`), torch's optimizer markers, and the
    rest of the step (:data:`OTHER`)."""
    name = path[-1]
    kind = next((_AUX_KIND[m] for m in reversed(path) if m in _AUX_KIND), None)
    if name in _AUX_KIND:
        return f"{_AUX_KIND[name]}: backward"
    if name in _AUX_PARTS and kind is not None:
        return f"{kind}: {_AUX_PARTS[name]}"
    for prefix, part in _TORCH_PARTS.items():
        if name.startswith(prefix):
            return part
    return _PARTS.get(name, OTHER)


def phase_seconds(events: Sequence, root: str = STEP_MARKER) -> tuple[dict[str, float], dict[str, float], float]:
    """Seconds per breakdown part (:func:`part_of`) from a profile's events (``prof.events()``), summed over every
    ``root`` marker: (wall-clock exclusive time of each part's markers, device time of the kernels launched
    inside them (empty without device activity), total wall time of the ``root`` markers).

    Exclusive: a marker's time less that of the markers inside it, so the parts add up to the total. Only the
    markers of the thread that entered ``root`` count (the engine marks its phases on the calling thread); a
    kernel counts toward the innermost marker around the start of the CPU op that launched it, on any thread (on
    CUDA, autograd runs backward ops on its own thread while the caller waits inside a marker)."""
    # host-side events only: a kernel's own event (and a marker's copy on the device timeline) is not one
    events = [e for e in events if getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU]
    roots = [e for e in events if e.name == root]
    threads = {e.thread for e in roots}
    marks = [(e.time_range.start, -e.time_range.end, _DEPTH.get(e.name, 1), 0, e) for e in events
             if _marker(e.name) and e.thread in threads]
    ops = [(e.time_range.start, 0, 9, 1, e) for e in events
           if not _marker(e.name) and getattr(e, "self_device_time_total", 0) > 0]
    wall: dict[str, float] = defaultdict(float)
    device: dict[str, float] = defaultdict(float)
    stack: list[list] = []  # open markers: [path, start, end, time of the markers inside]

    def close(until: float) -> None:
        while stack and stack[-1][2] <= until:
            path, start, end, inner = stack.pop()
            wall[part_of(path)] += (end - start - inner) / 1e6
            if stack:
                stack[-1][3] += end - start

    for start, neg_end, _, is_op, event in sorted(marks + ops, key=lambda t: t[:4]):
        close(start)
        if is_op:
            if stack:
                device[part_of(stack[-1][0])] += event.self_device_time_total / 1e6
        else:
            stack.append([(stack[-1][0] if stack else ()) + (event.name,), start, -neg_end, 0.0])
    close(float("inf"))
    total = sum(e.time_range.end - e.time_range.start for e in roots) / 1e6
    return dict(wall), dict(device), total


def breakdown(
    arch: str, k: int, method: str, batch: int = 128, steps: int = 3, seed: int = 0, trace_dir: Path | None = None
) -> dict:
    """Where one method's step time goes, with achieved GFLOP/s per part, and the profiler's top ops.

    The parts are read from a ``torch.profiler`` profile of ``steps`` steps by the engine's phase markers
    (:mod:`mlaan.engine.phases`; CPU activity, and CUDA's when the model is on a CUDA device). The profiler slows
    a step; the same steps unprofiled, timed before, are reported beside (``unprofiled_step_s``)."""
    model, optimizer = common.build(arch, method, k, seed=seed)
    images, targets = common.synthetic_batch(model, batch, seed=seed)
    flops = step_flops(model, images, targets)
    for _ in range(2):
        optimizer_step(model, optimizer, images, targets)
    unprofiled = [_timed_step(model, optimizer, images, targets)[0] for _ in range(steps)]
    activities = [ProfilerActivity.CPU]
    on_cuda = next(model.parameters()).is_cuda
    if on_cuda:
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            gc.collect()
            with record_function(STEP_MARKER):
                optimizer_step(model, optimizer, images, targets)
    if trace_dir is not None:
        prof.export_chrome_trace(str(trace_dir / "breakdown_trace.json"))
    wall, device, total = phase_seconds(prof.events())
    parts = {name: t / steps for name, t in wall.items()}
    total /= steps
    rows = []
    for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        row = {"part": name, "seconds": seconds, "share": seconds / total}
        if on_cuda:
            row["device_seconds"] = device.get(name, 0.0) / steps
        rows.append(row)
    fparts = flops["parts"]
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
    sort_by = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    return {
        "arch": arch,
        "k": k,
        "method": method,
        "batch": batch,
        "steps": steps,
        "step_s": total,
        "unprofiled_step_s": statistics.median(unprofiled),
        "parts": rows,
        "groups": groups,
        "top_ops": prof.key_averages().table(sort_by=sort_by, row_limit=20),
    }


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
    """Markdown of :func:`breakdown`'s result: parts, groups with GFLOP/s, the profiler's top ops."""
    device = any("device_seconds" in p for p in b["parts"])
    rows = [[p["part"], f"{p['seconds'] * 1000:.0f}", f"{p['share'] * 100:.1f}%"]
            + ([f"{p['device_seconds'] * 1000:.1f}"] if device else []) for p in b["parts"]]
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
        f"profiled steps, {b['step_s'] * 1000:.0f} ms/step; {b['unprofiled_step_s'] * 1000:.0f} ms/step "
        f"unprofiled)\n"
        + common.format_table(["part (exclusive time)", "ms/step", "share"] + (["device ms/step"] if device else []),
                              rows)
        + "\n\n"
        + common.format_table(["group", "ms/step", "GFLOP (floor)", "GFLOP/s"], groups)
        + f"\n\ntorch.profiler, top ops by self {'device' if device else 'CPU'} time ({b['steps']} steps):\n"
        + b["top_ops"]
    )


def plot(results: list[dict], path: Path) -> None:
    """Bars of each method's step time relative to BP, with its FLOP floors as markers (PNG at ``path``)."""
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
    common.save_figure(fig, path)


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[None]:
    """``n`` single-threaded busy-loop processes at this process's priority while inside: another job of the
    user's. (A niced one barely slows a step: the scheduler gives its core back to us.)"""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                              preexec_fn=signal_when_parent_dies(signal.SIGKILL))  # not left spinning if we are killed
             for _ in range(n)]
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
    p.add_argument("--cases", default=DEFAULT_CASES,
                   help="comma-separated ARCH:K cases; K follows the last colon (torchvision:resnet18:4)")
    p.add_argument("--methods", default=",".join(common.DEFAULT_METHODS), help="comma-separated methods")
    p.add_argument("--batch", type=int, default=128,
                   help="images per timed step (synthetic, of the model's input shape)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method before timing")
    p.add_argument("--repeats", type=int, default=7, help="timed interleaved rounds (the median is reported)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the idle cores, as `mlaan train` chooses them)")
    p.add_argument("--formats", default=None,
                   help=f"numeric formats to time each method in, the first is the reference; from "
                        f"{', '.join(FORMATS)} (cl: channels-last memory format). Default: fp32,fp32+cl, and "
                        f"bf16+cl on a CPU with bf16 instructions (AVX512-BF16 or AMX-BF16)")
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
    if args.formats is None:
        formats, why_formats = default_formats()
    else:
        formats, why_formats = parse_formats(args.formats), "as asked"
        warning = emulated_bf16_warning(formats)
        if warning:
            print(warning, file=sys.stderr, flush=True)
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
        print(f"formats: {','.join(formats)} ({why_formats})", flush=True)
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
    files = [out / "speed.json", out / "speed.md"]
    if common.plots_or_note():
        plot(results, out / "speed.png")
        files.append(out / "speed.png")
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
    print(f"\nwrote {', '.join(map(str, files))}", flush=True)
    return 0
