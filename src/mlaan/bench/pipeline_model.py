"""The pipeline cost model: predicted step time of module parallelism and of BP's 1F1B pipeline on P devices, and on
R × P layouts (R pipeline replicas of P stages), from measured per-module and per-block times.

**Local pipeline** (``mlaan.distributed.pipeline.ModulePipeline``, lock-step, no flush): a step takes one tick,
the slowest stage's busy time (:func:`stage_ticks`): its modules' times T_j + the activation send to the next stage
(+ with exact cascades, the next stage's first window−1 modules and the gradient coming back). The fill (P − 1 ticks)
comes once per run, so the steady state is the tick.

**BP under 1F1B** (``torch.distributed.pipelining.Schedule1F1B``, M micro-batches, a flush every optimizer step):
with τ_s = t_s(B/M) + sends_s(B/M) the time of stage s on one micro-batch,

    step ≈ Σ_s τ_s + (M − 1) × max_s τ_s        (= (M + P − 1) × τ for balanced stages)

— the first micro-batch's forward and the last one's backward cross every stage, the M − 1 others queue at the
slowest. For balanced stages this is GPipe's (Huang et al. 2019) and 1F1B's (PipeDream-Flush: Narayanan et al.
2019, "PipeDream: generalized pipeline parallelism for DNN training"; Narayanan et al. 2021, "Efficient
large-scale language model training on GPU clusters using Megatron-LM", §2.2) step, whose bubble is
(P − 1)/(M + P − 1) of it (:func:`bubble_fraction`); for unbalanced stages it is the tighter form (the balanced one
with the slowest stage would overstate BP's step). t_s(b): stage s's forward + backward of a micro-batch of b images,
the sum of its blocks' times *measured at b* (a small micro-batch runs at another speed per image, so B/M is
measured, not assumed linear); sends: the activation forward and its gradient backward at each of the stage's
boundaries. The stages are contiguous blocks (:func:`bp_stages`, the classifier head on the last stage), balanced by
the blocks' measured times at B/M as a user splitting BP for ``torch.distributed.pipelining`` would (and as the
local pipeline's ``--partition time`` is); ``mlaan bench pipeline``'s measured 1F1B run cuts equal block counts.

**R × P**: each replica sees B/R images; after its backward every stage all-reduces its trainable parameters'
gradients over the R replicas of that stage, a ring all-reduce (Patarasuk & Yuan 2009; Thakur et al. 2005):
2(R − 1) α + 2(R − 1)/R × bytes / bandwidth (:func:`ring_all_reduce_s`), not overlapped with compute (a bound: a
bucketed all-reduce would hide part of it). The slowest stage's compute + all-reduce sets the step.

A message costs α + bytes / bandwidth (:class:`Link`); ``mlaan bench pipeline`` measures α and the bandwidth with a
gloo ping-pong on loopback — a GPU interconnect (NVLink, InfiniBand) differs by orders of magnitude, so the
prediction takes ``--bandwidth`` / ``--latency`` to plug those in.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..distributed.pipeline import partition_modules
from ..engine import parse_method
from ..engine.engine_options import SHARED_TWIN_TRUNKS
from ..engine.lam import LeapTrunk, TwinTrunk
from . import common


@dataclass(frozen=True)
class Link:
    """A point-to-point link: ``latency_s`` per message (α) and ``bytes_per_s`` (bandwidth)."""

    latency_s: float
    bytes_per_s: float

    def seconds(self, nbytes: float) -> float:
        """Seconds to send one message of ``nbytes`` bytes: α + bytes / bandwidth."""
        return self.latency_s + nbytes / self.bytes_per_s


# ------------------------------------------------------------------------------------------------ formulas
def bubble_fraction(stages: int, micro_batches: int) -> float:
    """Share of a 1F1B (or GPipe) step a stage is idle: (P − 1)/(M + P − 1). Raises ValueError below 1."""
    if stages < 1 or micro_batches < 1:
        raise ValueError(f"need at least one stage and one micro-batch, got P={stages}, M={micro_batches}")
    return (stages - 1) / (micro_batches + stages - 1)


def ring_all_reduce_s(nbytes: float, replicas: int, link: Link) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` over ``replicas`` ranks: 2(R − 1) α + 2(R − 1)/R × bytes / bw;
    0 for one replica."""
    if replicas <= 1:
        return 0.0
    steps = 2 * (replicas - 1)
    return steps * link.latency_s + steps / replicas * nbytes / link.bytes_per_s


def stage_ticks(times: Sequence[float], ranges: Sequence[range], message_s: float | Sequence[float],
                cascade_wait: int, twin_state_s: Sequence[float] = ()) -> list[float]:
    """Busy seconds per step of each stage of a lock-step module pipeline: its modules' ``times``, plus (all but
    the last) the activation message to the next stage and, with exact cascades (``cascade_wait`` > 0), the next
    stage's first ``cascade_wait`` modules and the gradient message coming back. ``message_s``: one figure for
    every boundary, or one per boundary (stage r → r + 1). ``twin_state_s[r]``: seconds stage r spends receiving
    the state of blocks trained on other stages that its LAM EMA twins follow (:func:`twin_state_seconds`)."""
    ticks = []
    for r, run in enumerate(ranges):
        busy = sum(times[j] for j in run) + (twin_state_s[r] if twin_state_s else 0.0)
        if r < len(ranges) - 1:
            send = message_s if isinstance(message_s, (int, float)) else message_s[r]
            busy += send
            if cascade_wait:
                busy += sum(times[j] for j in list(ranges[r + 1])[:cascade_wait]) + send
        ticks.append(busy)
    return ticks


def predicted_tick(times: Sequence[float], ranges: Sequence[range], message_s: float | Sequence[float],
                   cascade_wait: int) -> float:
    """Seconds per step of a lock-step module pipeline: the slowest of :func:`stage_ticks`."""
    return max(stage_ticks(times, ranges, message_s, cascade_wait))


def local_pipeline_step(times: Sequence[float], ranges: Sequence[range], message_s: float | Sequence[float],
                        cascade_wait: int, stage_bytes: Sequence[float] = (), replicas: int = 1,
                        link: Link | None = None, twin_state_s: Sequence[float] = ()) -> float:
    """Seconds per step (steady state) of R replicas of a module pipeline: the slowest stage's tick (with
    ``twin_state_s`` as in :func:`stage_ticks`) plus its gradient all-reduce (``stage_bytes[r]``: stage r's
    trainable parameter bytes) over ``replicas``."""
    ticks = stage_ticks(times, ranges, message_s, cascade_wait, twin_state_s)
    return max(t + _all_reduce(stage_bytes, r, replicas, link) for r, t in enumerate(ticks))


def twin_state_seconds(local: dict, ranges: Sequence[range], link: Link) -> list[float]:
    """Per stage, the seconds to receive, every step, the state of each block trained on another stage whose LAM
    EMA twin one of the stage's modules runs (one message per block; what the module pipeline does for the
    paper's trunk, whose one twin per trunk follows the next module's first block, and what a pipeline of
    ``lam_trunk="twins"`` trunks, whose twins reach several stages ahead, would have to do). ``local``: a
    :func:`measure_profile` entry with ``module_blocks``, ``followed_blocks`` and ``block_state_bytes``; a
    profile saved without them (before they were measured) adds nothing."""
    if "followed_blocks" not in local:
        return [0.0] * len(ranges)
    seconds = []
    for run in ranges:
        owned = {i for j in run for i in local["module_blocks"][j]}
        needed = {i for j in run for i in local["followed_blocks"][j]} - owned
        seconds.append(sum(link.seconds(local["block_state_bytes"][i]) for i in sorted(needed)))
    return seconds


def bp_1f1b_step(micro_times: Sequence[float], stages: Sequence[range], micro_batches: int,
                 boundary_bytes: Sequence[float] = (), link: Link | None = None, stage_bytes: Sequence[float] = (),
                 replicas: int = 1) -> float:
    """Seconds per step of BP under 1F1B: Σ_s τ_s + (M − 1) × max_s τ_s (τ_s: stage s's blocks' ``micro_times``,
    forward + backward of one micro-batch, + its sends) + the slowest stage's all-reduce.

    ``boundary_bytes[i]``: bytes of block i's output for one micro-batch (what crosses a cut after block i, and
    its gradient back); needed with ``link`` when P > 1. ``stage_bytes``: each stage's parameter bytes."""
    per_micro = []
    for s, run in enumerate(stages):
        busy = sum(micro_times[i] for i in run)
        if s < len(stages) - 1:
            busy += _send(boundary_bytes, run.stop - 1, link)  # activation forward
        if s > 0:
            busy += _send(boundary_bytes, run.start - 1, link)  # its gradient back
        per_micro.append(busy)
    all_reduce = max(_all_reduce(stage_bytes, s, replicas, link) for s in range(len(stages)))
    return sum(per_micro) + (micro_batches - 1) * max(per_micro) + all_reduce


def bp_stages(unit_costs: Sequence[float], stages: int) -> list[range]:
    """BP's 1F1B stages: contiguous runs of the backbone's blocks before the classifier head, minimising the
    costliest run (``unit_costs``, one per block before the head: ``[1.0] * n`` for equal block counts, as
    ``mlaan bench pipeline`` cuts it), the head (block ``len(unit_costs)``) on the last stage."""
    cuts = partition_modules(unit_costs, stages)
    return cuts[:-1] + [range(cuts[-1].start, len(unit_costs) + 1)]


def bp_time_stages(block_seconds: Sequence[float], stages: int) -> list[range]:
    """:func:`bp_stages` balanced by measured time (``block_seconds``: every block's, the head's last, which
    counts with the block before it)."""
    *body, last, head = block_seconds
    return bp_stages([*body, last + head], stages)


def _send(boundary_bytes: Sequence[float], block: int, link: Link | None) -> float:
    if link is None:
        raise ValueError("a pipeline of several stages needs a link (latency, bandwidth) for its messages")
    return link.seconds(boundary_bytes[block])


def _all_reduce(stage_bytes: Sequence[float], stage: int, replicas: int, link: Link | None) -> float:
    if replicas <= 1:
        return 0.0
    if link is None or not stage_bytes:
        raise ValueError("R > 1 replicas need each stage's parameter bytes and a link for the all-reduce")
    return ring_all_reduce_s(stage_bytes[stage], replicas, link)


# ------------------------------------------------------------------------------------------- measurement
def block_times(arch: str, batches: Sequence[int], threads: int = 1, repeats: int = 3) -> dict[str, Any]:
    """BP's per-block costs for :func:`bp_1f1b_step`, measured in this process with ``threads`` threads.

    Returns ``{"seconds": {str(batch): [s per block]}, "output_bytes_per_image": [...], "parameter_bytes": [...]}``,
    one entry per backbone block (the classifier head last, its loss included): the median over ``repeats``
    interleaved rounds (after one warm-up) of the block's forward + backward on random data of ``batch`` images.
    """
    return measure_profile(arch, "bp", 1, (), batches, threads, repeats)["bp"]


def measure_profile(arch: str, method: str, k: int, local_batches: Sequence[int], bp_batches: Sequence[int],
                    threads: int = 1, repeats: int = 3, options: dict | None = None) -> dict[str, Any]:
    """Per-module times of ``method`` (K = ``k``, built with the engine ``options``) at each of ``local_batches``
    and BP's per-block times at each of ``bp_batches``, in interleaved rounds (one pass of every case a round,
    medians over ``repeats`` rounds after one warm-up) so that other load on the cores touches both alike.
    ``{"local": ..., "bp": ...}``, each with ``seconds`` per batch, ``output_bytes_per_image`` and trainable
    ``parameter_bytes`` per module (per block); ``local`` also with each module's backbone blocks
    (``module_blocks``), the blocks whose EMA twins its aux nets run (``followed_blocks``) and each block's state
    bytes (``block_state_bytes``), for :func:`twin_state_seconds`.

    With one thread the clock is the thread's CPU time (``time.thread_time``: the work runs in this thread, and
    what other processes on the cores take from it is not counted — their cache pollution still is); with several,
    wall time (``time.perf_counter``)."""
    clock = time.thread_time if threads == 1 else time.perf_counter
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cases = []
        if local_batches:
            cases += [("local", b, _LocalPass(arch, method, k, b, clock, options))
                      for b in sorted(set(local_batches))]
        cases += [("bp", b, _BlockPass(arch, b, clock)) for b in sorted(set(bp_batches))]
        for _, _, case in cases:
            case.run()  # warm-up, and the shapes
        rounds: dict[tuple[str, int], list[list[float]]] = {(kind, b): [] for kind, b, _ in cases}
        for _ in range(repeats):
            for kind, b, case in cases:
                rounds[kind, b].append(case.run())
    finally:
        torch.set_num_threads(saved_threads)
    profile: dict[str, Any] = {"threads": threads, "repeats": repeats, "clock": clock.__name__}
    for kind, b, case in cases:
        entry = profile.setdefault(kind, {"seconds": {}, "output_bytes_per_image": case.output_bytes_per_image,
                                          "parameter_bytes": case.parameter_bytes})
        entry["seconds"][str(b)] = [statistics.median(col) for col in zip(*rounds[kind, b])]
        if kind == "local":
            entry.update(case.twin_facts)
    return profile


class _BlockPass:
    """One BP training pass of a backbone, block by block, timing each block's forward + backward."""

    def __init__(self, arch: str, batch: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        model, _ = common.build(arch, "bp", 1)
        self.blocks = list(model.backbone.blocks)
        self.images, self.targets = common.synthetic_batch(model, batch)
        self.grads: list[torch.Tensor] = []
        self.output_bytes_per_image: list[float] = []
        self.parameter_bytes = [float(_bytes(b.parameters())) for b in self.blocks]

    def run(self) -> list[float]:
        x, seconds, last = self.images, [], len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x_in = x.detach().requires_grad_(i > 0)  # the images need no gradient; every later input does
            if len(self.grads) <= i:  # the first pass fixes each block's output gradient, outside the timing
                y = block(x_in)
                self.grads.append(torch.randn_like(y))
                self.output_bytes_per_image.append(y.numel() * y.element_size() / len(self.images))
            start = self.clock()
            y = block(x_in)
            if i == last:
                F.cross_entropy(y, self.targets).backward()
            else:
                y.backward(self.grads[i])
            seconds.append(self.clock() - start)
            x = y.detach()
        for block in self.blocks:
            block.zero_grad(set_to_none=True)
        return seconds


class _LocalPass:
    """One training step of a local model, timing each local module's part (forward, aux losses, cascades it
    starts, backward) as ``module_costs(model, "time")`` does."""

    def __init__(self, arch: str, method: str, k: int, batch: int,
                 clock: Callable[[], float] = time.perf_counter, options: dict | None = None) -> None:
        self.clock = clock
        options = dict(options or {})
        # the pipeline's twins follow their blocks one step late (ema_lag 1); a trunk of shared twins cannot lag,
        # and the lag changes no cost
        lag = {"ema_lag": 1} if parse_method(method).leap and options.get("lam_trunk") not in SHARED_TWIN_TRUNKS else {}
        self.model, _ = common.build(arch, method, k, **lag, **options)
        self.twin_facts = twin_facts(self.model)
        self.images, self.targets = common.synthetic_batch(self.model, batch)
        self.output_bytes_per_image: list[float] = []
        self.parameter_bytes = [float(_bytes(p for part in self.model.module_parts(j) for p in part.parameters()
                                             if p.requires_grad)) for j in range(len(self.model.local_modules))]

    def run(self) -> list[float]:
        step = self.model.begin_step(self.images, self.targets)
        x, seconds = step.images, []
        for j in step.modules:
            start = self.clock()
            x = step.run_module(j, x)
            seconds.append(self.clock() - start)
            if len(self.output_bytes_per_image) < len(seconds):
                self.output_bytes_per_image.append(x.numel() * x.element_size() / len(self.images))
        step.finish()
        self.model.zero_grad(set_to_none=True)
        return seconds


def twin_facts(model: Any) -> dict[str, list]:
    """What :func:`twin_state_seconds` needs of a local model: ``module_blocks[j]`` (backbone block indices of
    local module j), ``followed_blocks[j]`` (blocks whose EMA twin module j's aux nets run and move after each
    step: the following :class:`~mlaan.engine.lam.LeapTrunk` twins, every :class:`~mlaan.engine.lam.TwinTrunk`
    twin) and ``block_state_bytes[i]`` (block i's ``state_dict`` bytes: what a stage sends for one twin)."""
    following = {id(t) for t in model.following_trunks()}
    followed = []
    for j in range(len(model.local_modules)):
        blocks: set[int] = set()
        for part in model.module_parts(j)[1:]:
            for trunk in part.modules():
                if isinstance(trunk, TwinTrunk):
                    blocks.update(trunk.indices)
                elif isinstance(trunk, LeapTrunk) and id(trunk) in following:
                    blocks.add(trunk.source_index)
        followed.append(sorted(blocks))
    return {"module_blocks": [list(units) for units in model.split], "followed_blocks": followed,
            "block_state_bytes": [float(_bytes(b.state_dict().values())) for b in model.backbone.blocks]}


def _bytes(params: Any) -> int:
    return sum(p.numel() * p.element_size() for p in params)


# -------------------------------------------------------------------------------------------- prediction
DEFAULT_LAYOUTS = ((1, 2), (1, 4), (1, 8), (2, 2), (2, 4), (4, 2))  # (R replicas, P stages)


def parse_layouts(text: str) -> list[tuple[int, int]]:
    """``"1x2,2x4"`` → ``[(1, 2), (2, 4)]`` (R replicas × P stages). Raises ValueError on another form."""
    layouts = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            r, p = (int(n) for n in item.lower().replace("×", "x").split("x"))
        except ValueError:
            raise ValueError(f"--layouts wants R×P items like 1x4,2x2; got {item!r}") from None
        if r < 1 or p < 1:
            raise ValueError(f"--layouts: R and P must be at least 1, got {item!r}")
        layouts.append((r, p))
    return layouts


def needed_batches(batch: int, layouts: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """The batches the prediction measures: per-module times at B and B/R, per-block BP times at B and B/(R·M),
    M ∈ {P, 2P}; a layout whose micro-batches do not divide B evenly is left out."""
    local, bp = {batch}, {batch}
    for r, p in layouts:
        if batch % (r * 2 * p) == 0:
            local.add(batch // r)
            bp.update(batch // (r * m) for m in (p, 2 * p))
    return sorted(local), sorted(bp)


def multi_device_prediction(config: dict, profile: dict, link: Link,
                            layouts: Sequence[tuple[int, int]] = DEFAULT_LAYOUTS) -> dict[str, Any]:
    """The local pipeline and BP-1F1B (M = P and 2P) predicted on each R × P layout, from a :func:`measure_profile`
    and the run's ``config`` (``mlaan bench pipeline``'s: ``method``, ``batch_size``, ``boundary``; ``window``).

    Returns ``{"one_device": {"local_s", "bp_s"}, "rows": [...], "skipped": [reasons]}``; a row has the layout,
    ``local_s`` and ``local_speedup`` (one device running the method ÷ the layout), and per M the BP-1F1B ``s``,
    ``speedup`` (over one device running BP), ``bubble`` and ``local_over_bp``."""
    batch = config["batch_size"]
    local, bp = profile["local"], profile["bp"]
    one = {"local_s": sum(local["seconds"][str(batch)]), "bp_s": sum(bp["seconds"][str(batch)])}
    result: dict[str, Any] = {"one_device": one, "link": vars(link), "layouts": [list(x) for x in layouts],
                              "rows": [], "skipped": []}
    for r, p in layouts:
        if batch % (r * 2 * p):
            result["skipped"].append(f"{r}×{p}: batch {batch} does not split into {r} × {2 * p} micro-batches")
            continue
        try:
            row = _local_row(config, local, link, r, p)
        except ValueError as e:
            result["skipped"].append(f"{r}×{p}: {e}")
            continue
        row["local_speedup"] = one["local_s"] / row["local_s"]
        row["bp"] = [_bp_entry(bp, link, r, p, m, batch, one["bp_s"], row["local_s"]) for m in (p, 2 * p)]
        result["rows"].append(row)
    return result


def _local_row(config: dict, local: dict, link: Link, replicas: int, stages: int) -> dict[str, Any]:
    spec = parse_method(config["method"])
    wait = config.get("window", 2) - 1 if spec.cascade and config.get("boundary", "exact") == "exact" else 0
    images = config["batch_size"] // replicas
    times = local["seconds"][str(images)]
    cut = partition_modules(times, stages, max(1, wait))
    messages = [link.seconds(local["output_bytes_per_image"][run.stop - 1] * images) for run in cut[:-1]]
    stage_bytes = [sum(local["parameter_bytes"][j] for j in run) for run in cut]
    state_s = twin_state_seconds(local, cut, link)
    seconds = local_pipeline_step(times, cut, messages, wait, stage_bytes, replicas, link, state_s)
    return {"replicas": replicas, "stages": stages, "devices": replicas * stages, "images_per_replica": images,
            "local_s": seconds, "local_ranges": [[run.start, run.stop] for run in cut],
            "twin_state_s": state_s}


def _bp_entry(bp: dict, link: Link, replicas: int, stages: int, micro: int, batch: int, one_s: float,
              local_s: float) -> dict[str, Any]:
    images = batch // (replicas * micro)
    times = bp["seconds"][str(images)]
    cut = bp_time_stages(times, stages)
    stage_bytes = [sum(bp["parameter_bytes"][i] for i in run) for run in cut]
    sent = [b * images for b in bp["output_bytes_per_image"]]
    seconds = bp_1f1b_step(times, cut, micro, sent, link, stage_bytes, replicas)
    return {"micro_batches": micro, "micro_batch": images, "s": seconds, "speedup": one_s / seconds,
            "bubble": bubble_fraction(stages, micro), "local_over_bp": local_s / seconds}


def format_prediction(result: dict, method: str) -> str:
    """The multi-device prediction as a markdown table: per layout, s/step and × one device for the local pipeline
    and BP-1F1B (M = P, 2P), and local ÷ BP (above 1: the local pipeline is slower)."""
    one = result["one_device"]
    headers = ["R × P", "devices", f"{method} s/step (× 1 dev)", "bp 1F1B M=P s/step (× 1 dev)",
               "bp 1F1B M=2P s/step (× 1 dev)", f"{method} ÷ bp (M=P / 2P)"]
    rows = [["1 device", 1, f"{one['local_s']:.3f} (1.00)", f"{one['bp_s']:.3f} (1.00)", "—",
             f"{one['local_s'] / one['bp_s']:.2f}"]]
    for row in result["rows"]:
        a, b = row["bp"]
        rows.append([f"{row['replicas']} × {row['stages']}", row["devices"],
                     f"{row['local_s']:.3f} ({row['local_speedup']:.2f})", f"{a['s']:.3f} ({a['speedup']:.2f})",
                     f"{b['s']:.3f} ({b['speedup']:.2f})", f"{a['local_over_bp']:.2f} / {b['local_over_bp']:.2f}"])
    out = [common.format_table(headers, rows)]
    link = result["link"]
    out.append(f"link: {link['latency_s'] * 1e6:.0f} µs + bytes / {link['bytes_per_s'] / 1e9:.2f} GB/s"
               f"{' (' + result['link_source'] + ')' if result.get('link_source') else ''}")
    out.extend(f"skipped {reason}" for reason in result["skipped"])
    return "\n".join(out)


def predict_from_saved(saved: dict, layouts: Sequence[tuple[int, int]] = DEFAULT_LAYOUTS,
                       bandwidth: float | None = None, latency: float | None = None,
                       repeats: int = 3, options: dict | None = None) -> dict[str, Any]:
    """The multi-device prediction for the setting of a saved ``mlaan bench pipeline`` result (its ``config``,
    ``window`` and ping-pong ``message``), without starting processes: the per-module and per-block times are
    measured here, one process, with the thread count each of its ranks had (``cores // ranks``).

    ``bandwidth`` (bytes/s) and ``latency`` (s) replace the measured gloo-loopback link (e.g. with NVLink's).
    ``options``: engine options of the local method on top of the saved run's (e.g. ``{"lam_trunk": "twins"}``,
    a trunk the module pipeline does not run: the prediction is of the pipeline it would be, its twins' block
    states sent every step, :func:`twin_state_seconds`). Also reports Σ T_j of the saved run beside today's
    (``saved_local_s``, None where ``options`` change the method): their ratio shows how differently loaded the
    cores are now — the comparisons inside one prediction share the same load."""
    saved_options = saved["config"].get("options", {})
    merged = {**saved_options, **(options or {})}
    cfg = {**saved["config"], "options": merged, "window": merged.get("window", saved.get("window", 2))}
    message = saved["message"]
    link = Link(latency if latency is not None else message["latency_s"],
                bandwidth if bandwidth is not None else message["bytes_per_s"])
    threads = max(1, cfg["cores"] // cfg["ranks"])
    local_batches, bp_batches = needed_batches(cfg["batch_size"], layouts)
    profile = measure_profile(cfg["arch"], cfg["method"], cfg["k"], local_batches, bp_batches, threads, repeats,
                              merged)
    result = multi_device_prediction(cfg, profile, link, layouts)
    result["options"] = merged
    result["link_source"] = ("given" if bandwidth is not None or latency is not None
                             else "gloo loopback ping-pong of the saved run")
    same_method = merged == saved_options and "module_times" in saved
    result["saved_local_s"] = sum(saved["module_times"]) if same_method else None
    result["profile"] = profile
    result["threads"] = threads
    return result
