"""`mlaan bench pipeline`: module parallelism's step time against one process and against BP's classic pipeline.

One set of P processes (gloo on the CPU; ``--device cuda``: NCCL, one GPU a rank) first measures each rank's
memory: its parameters (each rank holds only its own modules, ``ModulePipeline`` releases the rest) and the peak
of one pipelined training step after a warm-up one — on the CPU by the exact accounting of ``mlaan bench memory``
(:class:`~mlaan.bench.memory.MemoryAccountant`), on a GPU ``torch.cuda.max_memory_allocated`` — against one
process training the whole model the same way (rank 0, at the end). Then it runs interleaved rounds; in each round
  1. the one-process engine on rank 0 with all ``--cores`` threads (the other ranks wait at a barrier), for the
     method and for BP;
  2. the module pipeline (``mlaan.distributed.pipeline.ModulePipeline``) on P ranks with cores/P threads each, recording
     each rank's step and receive-wait seconds;
  3. BP cut into P stages by ``torch.distributed.pipelining`` (``Schedule1F1B``, P micro-batches): the classic
     baseline on the same P ranks (its micro-batches change BatchNorm statistics; timing only).
Seconds per step are medians over the rounds of (window wall time / steps), pipeline fill included.

Then an analytical model: the per-module times T_j (measured on rank 0 with cores/P threads) and the message cost
(latency + bytes/bandwidth from a ping-pong between ranks 0 and 1) predict the pipeline's tick,
max over ranks of Σ_{j∈r} T_j + sends, plus, with exact cascades, the wait for the next rank's first window−1
modules; that is printed beside the measurement, and used to predict P = 4 and 8 from the same T_j
(``--module-times FILE`` takes T_j measured elsewhere, e.g. per-module CUDA times).

Last, the multi-device prediction (``mlaan.bench.pipeline_model``, formulas and sources there): for each R × P layout
(R pipeline replicas of P stages; default P = 2, 4, 8 and 2×2, 2×4, 4×2) the local pipeline's step against BP under
1F1B with M = P and 2P micro-batches, from per-module and per-block times measured in one process at B, B/R and
B/(R·M), the ping-pong's link, and a ring all-reduce per stage across replicas. ``--predict-from pipeline.json``
prints and writes that table for a saved run's setting without starting processes (``--bandwidth``/``--latency``
plug in another interconnect than gloo loopback).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from .. import models
from ..distributed.pipeline import (
    BOUNDARY_MODES,
    PARTITION_MODES,
    ModulePipeline,
    boundaries,
    min_modules_per_rank,
    module_costs,
    partition_modules,
)
from ..engine import parse_method
from ..engine.engine_options import SHARED_TWIN_TRUNKS
from ..training.loop import make_optimizer, optimizer_step
from . import common
from .memory import MemoryAccountant, parse_options
from .pipeline_model import (
    DEFAULT_LAYOUTS,
    bp_stages,
    format_prediction,
    parse_layouts,
    predict_from_saved,
    predicted_tick,
)

DEADLINE_S = 3600


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="resnet32")
    p.add_argument("--method", default="dgl+mlaan", help="the local-learning method to pipeline")
    p.add_argument("--local-modules", type=int, default=None, help="K (default: the architecture's)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="engine option of the method, e.g. window=3 (repeatable); with --predict-from, on top of "
                        "the saved run's: lam_trunk=twins predicts a trunk the pipeline does not run yet")
    p.add_argument("--ranks", type=int, default=2, help="P, processes of the pipeline")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: gloo processes; cuda: NCCL, rank r on GPU r (needs --ranks GPUs)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                   help="CPU threads in all: the one-process runs use all, each rank cores/P")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=6, help="timed steps per run and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each timed window")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median over them)")
    p.add_argument("--boundary", choices=BOUNDARY_MODES, default="exact")
    p.add_argument("--partition", choices=PARTITION_MODES, default="time")
    p.add_argument("--predict", default="4,8", help="rank counts to predict with the model")
    p.add_argument("--module-times", default=None, metavar="FILE",
                   help="JSON list of per-module seconds (e.g. CUDA) for the predictions instead of the measured")
    p.add_argument("--output-dir", default=None)
    g = p.add_argument_group("multi-device prediction (mlaan.bench.pipeline_model)")
    g.add_argument("--predict-from", default=None, metavar="PIPELINE_JSON",
                   help="start no processes: predict the layouts for the setting of a saved pipeline.json")
    g.add_argument("--layouts", default=",".join(f"{r}x{p}" for r, p in DEFAULT_LAYOUTS),
                   help="R×P layouts to predict: R pipeline replicas of P stages (default %(default)s)")
    g.add_argument("--bandwidth", type=float, default=None, metavar="BYTES_PER_S",
                   help="link bandwidth for the prediction instead of the measured gloo loopback (e.g. NVLink's)")
    g.add_argument("--latency", type=float, default=None, metavar="S",
                   help="per-message latency for the prediction instead of the measured")
    g.add_argument("--predict-repeats", type=int, default=3,
                   help="interleaved rounds of the per-module and per-block timing behind the prediction")


def run(args: argparse.Namespace) -> int:
    layouts = parse_layouts(args.layouts)
    options = parse_options(args.option)
    if args.predict_from:
        return _run_prediction(args, layouts, options)
    spec = parse_method(args.method)
    if spec.base.end_to_end:
        raise ValueError(f"method {args.method!r} trains end to end; module parallelism needs a local method")
    if spec.leap and options.get("lam_trunk") in SHARED_TWIN_TRUNKS:
        trunk = options["lam_trunk"]
        raise ValueError(f"--option lam_trunk={trunk}: the module pipeline does not run a trunk of shared EMA "
                         "twins (each stage would need later stages' blocks every step); predict it from a saved "
                         f"run: --predict-from PIPELINE_JSON --option lam_trunk={trunk}")
    if spec.leap and "ema_lag" in options:
        raise ValueError(f"--option ema_lag={options['ema_lag']}: the module pipeline sets ema_lag 1 itself (a twin "
                         "whose block is on the next rank sees it one step late)")
    _check_method_options(args.method, options)
    common.check_options([args.method], {"ema_lag": 1, **options} if spec.leap else options)
    args.arch = common.check_arch(args.arch)
    if args.ranks < 2:
        raise ValueError(f"--ranks must be at least 2, got {args.ranks}")
    if args.device == "cuda" and torch.cuda.device_count() < args.ranks:
        raise ValueError(f"--device cuda --ranks {args.ranks} needs {args.ranks} GPUs, "
                         f"found {torch.cuda.device_count()}")
    if args.cores < args.ranks:
        raise ValueError(f"--cores {args.cores} is fewer than --ranks {args.ranks}: one thread per rank at least")
    k = args.local_modules or models.default_local_modules(args.arch)
    predict = common.parse_ints(args.predict, "--predict")
    module_times = json.loads(Path(args.module_times).read_text()) if args.module_times else None
    out = common.output_dir(args.output_dir, "pipeline")
    cfg = {"arch": args.arch, "method": args.method, "k": k, "ranks": args.ranks, "cores": args.cores,
           "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
           "boundary": args.boundary, "partition": args.partition, "device": args.device,
           "options": options}
    machine = common.machine_description(f"{args.cores} threads in all, {args.cores // args.ranks} a rank")
    cfg["loadavg_before"] = os.getloadavg()[0]
    print(f"mlaan bench pipeline on {machine}; code {common.code_version()}; load average "
          f"{cfg['loadavg_before']:.1f} (other work on these cores skews the comparison)")
    print(json.dumps(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_rank_main, args=(args.ranks, tmp, cfg), nprocs=args.ranks, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + DEADLINE_S
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise RuntimeError(f"pipeline ranks still running after {DEADLINE_S} s")
        measured = json.loads((Path(tmp) / "result.json").read_text())
    cfg["loadavg_after"] = os.getloadavg()[0]
    result = {"config": cfg, "machine": machine, "code": common.code_version(), **measured}
    result["model"] = _model_report(measured, module_times or measured["module_times"], cfg, predict)
    print(_table(result))
    result["multi_device"] = _predict(result, layouts, args)
    common.write_json(out / "pipeline.json", result)
    print(f"wrote {out / 'pipeline.json'}")
    return 0


def _run_prediction(args: argparse.Namespace, layouts: list[tuple[int, int]], options: dict) -> int:
    """``--predict-from``: the multi-device table for a saved run's setting (``options`` on top of its engine
    options), written as multi_device.json."""
    saved = json.loads(Path(args.predict_from).read_text())
    if options:
        _check_method_options(saved["config"]["method"], options)
    out = common.output_dir(args.output_dir, "pipeline")
    print(f"mlaan bench pipeline --predict-from {args.predict_from} on {common.machine_description()}; "
          f"code {common.code_version()}; load average {os.getloadavg()[0]:.1f}")
    result = {"source": str(args.predict_from), "config": saved["config"], "code": common.code_version(),
              "machine": common.machine_description(), "saved_code": saved.get("code"),
              **_predict(saved, layouts, args, options)}
    common.write_json(out / "multi_device.json", result)
    print(f"wrote {out / 'multi_device.json'}")
    return 0


def _check_method_options(method: str, options: dict) -> None:
    """One-line ValueError where ``method`` cannot be built with ``options`` or does not read one of them (a
    prediction would silently be of the method without it)."""
    unread = sorted(set(options) - set(common.read_options(method, options)))
    if unread:
        raise ValueError(f"--option {unread[0]}: {method} does not read it (it changes nothing for this method)")
    common.check_options([method], options)


def _predict(saved: dict, layouts: list[tuple[int, int]], args: argparse.Namespace,
             options: dict | None = None) -> dict[str, Any]:
    prediction = predict_from_saved(saved, layouts, args.bandwidth, args.latency, args.predict_repeats, options)
    method = " ".join(filter(None, (saved["config"]["method"], common.options_text(prediction["options"]))))
    print(f"\nmulti-device prediction ({method}, batch {saved['config']['batch_size']}, "
          f"{prediction['threads']} thread(s) a device; × 1 dev: speed-up over one device running the same method):")
    print(format_prediction(prediction, method))
    if prediction["saved_local_s"]:
        print(f"Σ T_j now {prediction['one_device']['local_s']:.3f} s vs {prediction['saved_local_s']:.3f} s in the "
              "saved run (its wall time; another machine or load shows here; every figure of this table is from now)")
    return prediction


# ------------------------------------------------------------------------------------------ the ranks
def _rank_main(rank: int, world: int, tmp: str, cfg: dict[str, Any]) -> None:
    each = max(1, cfg["cores"] // world)
    torch.set_num_threads(each)
    cuda = cfg.get("device") == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        result = _measure(rank, world, each, cfg)
        if rank == 0:
            (Path(tmp) / "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _measure(rank: int, world: int, each: int, cfg: dict) -> dict[str, Any]:
    spec = parse_method(cfg["method"])
    # the pipeline's EMA twins follow a block on the next rank one step late: ema_lag 1 in one process too
    build_options = {"ema_lag": 1, **cfg["options"]} if spec.leap else dict(cfg["options"])
    device = torch.device(f"cuda:{rank}") if cfg.get("device") == "cuda" else torch.device("cpu")
    probe, _ = common.build(cfg["arch"], cfg["method"], cfg["k"], **build_options)
    images, targets = common.synthetic_batch(probe, cfg["batch_size"])
    # The partition and the per-module times come from rank 0 (measured with a rank's thread count, on its
    # device), broadcast.
    shared: list[Any] = [None, None]
    if rank == 0:
        times = module_costs(probe.to(device), "time", cfg["batch_size"])
        probe.to("cpu")  # before the memory of rank 0's share is measured
        costs = times if cfg["partition"] == "time" else module_costs(probe, cfg["partition"], cfg["batch_size"])
        low = min_modules_per_rank(probe, cfg["boundary"])
        shared = [times, [(r.start, r.stop) for r in partition_modules(costs, world, low)]]
    dist.broadcast_object_list(shared, src=0)
    times, ranges = shared[0], [range(a, b) for a, b in shared[1]]
    barriers = boundaries(ranges) if cfg["boundary"] == "cut" else ()
    model, _ = common.build(cfg["arch"], cfg["method"], cfg["k"], cascade_barriers=barriers, **build_options)
    pipe = ModulePipeline(model, ranges, rank, cfg["boundary"]).to(device)  # the other ranks' modules released
    optimizer = make_optimizer(model)  # after the release: it holds no released tensor
    message = _message_cost(rank, probe, images, ranges, pipe.comm_device)
    images, targets = images.to(device), targets.to(device)
    memory = {"params": pipe.parameter_count(),
              **_step_memory(model, optimizer, lambda: pipe.optimizer_step(optimizer, images, targets), images,
                             targets, device, pipe.drain)}
    sequential = (common.build(cfg["arch"], cfg["method"], cfg["k"], device=device, **build_options)
                  if rank == 0 else None)
    bp_sequential = common.build(cfg["arch"], "bp", 1, device=device) if rank == 0 else None
    bp_stage = _bp_stage(cfg, rank, world, images)

    rows: dict[str, list[float]] = {"sequential": [], "pipeline": [], "bp_sequential": [], "bp_1f1b": []}
    rank_steps: list[list[float]] = []
    rank_waits: list[list[float]] = []
    for _ in range(cfg["rounds"]):
        for name, pair in (("sequential", sequential), ("bp_sequential", bp_sequential)):
            dist.barrier()
            if rank == 0:
                torch.set_num_threads(cfg["cores"])
                rows[name].append(_time_one_process(*pair, images, targets, cfg))
                torch.set_num_threads(each)
            dist.barrier()
        seconds, steps, waits = _time_pipeline(pipe, optimizer, images, targets, cfg)
        rows["pipeline"].append(seconds)
        rank_steps.append(steps)
        rank_waits.append(waits)
        rows["bp_1f1b"].append(_time_1f1b(bp_stage, rank, world, images, targets, cfg))
    per_rank = _gather({"step_s": statistics.median(sum(rank_steps, [])),
                        "wait_s": statistics.median(sum(rank_waits, [])), **memory})
    one_process = _one_process_memory(cfg, build_options, images, targets, device) if rank == 0 else None
    return {
        "one_process": one_process,
        "seconds_per_step": {name: statistics.median(v) for name, v in rows.items() if v},
        "rounds": rows,
        "ranges": [(r.start, r.stop) for r in ranges],
        "module_times": times,
        "message": message,
        "per_rank": per_rank,
        "window": probe.options.window,
    }


def _time_one_process(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                      targets: torch.Tensor, cfg: dict) -> float:
    for _ in range(cfg["warmup"]):
        optimizer_step(model, optimizer, images, targets)
    _sync(images.device)
    start = time.perf_counter()
    for _ in range(cfg["steps"]):
        optimizer_step(model, optimizer, images, targets)
    _sync(images.device)
    return (time.perf_counter() - start) / cfg["steps"]


def _time_pipeline(pipe: ModulePipeline, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                   targets: torch.Tensor, cfg: dict) -> tuple[float, list[float], list[float]]:
    for _ in range(cfg["warmup"]):
        pipe.optimizer_step(optimizer, images, targets)
    pipe.drain()
    _sync(images.device)
    dist.barrier()
    start = time.perf_counter()
    steps, waits = [], []
    for _ in range(cfg["steps"]):
        stats = pipe.optimizer_step(optimizer, images, targets)
        steps.append(stats["step_s"])
        waits.append(stats["wait_s"])
    pipe.drain()
    _sync(images.device)
    dist.barrier()  # the window ends when the last rank is done
    return (time.perf_counter() - start) / cfg["steps"], steps, waits


def _gather(mine: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(found, mine)
    return found


# --------------------------------------------------------------------------------------------- memory
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_memory(model: nn.Module, optimizer: torch.optim.Optimizer, step: Any, images: torch.Tensor,
                 targets: torch.Tensor, device: torch.device, drain: Any = None, base: int = 0) -> dict[str, Any]:
    """Peak bytes of one training step (``step()``), after a warm-up one (so that the optimizer state exists): on
    a GPU ``torch.cuda.max_memory_allocated`` less ``base`` (what was allocated before this model was built); on
    the CPU the exact accounting of ``mlaan bench memory`` (:class:`MemoryAccountant`: the live storages of the
    model's held tensors, gradients, optimizer state, the batch and everything the step allocates, messages
    included). Also the process's peak RSS so far (the host, which built the whole model once). ``drain``: wait
    for the step's messages (a pipeline rank)."""
    step()
    if drain is not None:
        drain()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        if drain is not None:
            drain()
        _sync(device)
        peak, kind = torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated"
    else:
        acc = MemoryAccountant()
        acc.register_static(model, optimizer, (images, targets))
        with acc:
            step()
            if drain is not None:
                drain()
        peak, kind = acc.peak, "accounted"
    return {"peak_bytes": int(peak), "peak_kind": kind,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _one_process_memory(cfg: dict, build_options: dict, images: torch.Tensor, targets: torch.Tensor,
                        device: torch.device) -> dict[str, Any]:
    """The same step in one process, training the whole model (a fresh one, on rank 0's device)."""
    torch.set_num_threads(cfg["cores"])
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model, optimizer = common.build(cfg["arch"], cfg["method"], cfg["k"], device=device, **build_options)
    params = sum(p.numel() for p in model.parameters())
    memory = _step_memory(model, optimizer, lambda: optimizer_step(model, optimizer, images, targets), images,
                          targets, device, base=base)
    memory.pop("peak_rss_bytes")  # rank 0's process's, which holds much more than this model by now
    return {"params": params, **memory}


# ----------------------------------------------------------------------------------- BP's 1F1B pipeline
def _bp_stage(cfg: dict, rank: int, world: int, images: torch.Tensor) -> tuple[Any, torch.optim.Optimizer]:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    torch.manual_seed(0)
    backbone = models.create(cfg["arch"])
    equal = bp_stages([1.0] * (len(backbone.blocks) - 1), world)  # equal block counts, the head on the last
    stage_module = nn.Sequential(*(backbone.blocks[i] for i in equal[rank])).to(images.device)
    micro = max(world, 2)
    stage = PipelineStage(stage_module, rank, world, images.device)
    schedule = Schedule1F1B(stage, n_microbatches=micro, loss_fn=lambda out, y: F.cross_entropy(out, y))
    return schedule, make_optimizer(stage_module)


def _time_1f1b(stage: tuple[Any, torch.optim.Optimizer], rank: int, world: int, images: torch.Tensor,
               targets: torch.Tensor, cfg: dict) -> float:
    schedule, optimizer = stage

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            schedule.step(images)
        elif rank == world - 1:
            schedule.step(target=targets, losses=[])
        else:
            schedule.step()
        optimizer.step()

    for _ in range(cfg["warmup"]):
        step()
    _sync(images.device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(cfg["steps"]):
        step()
    _sync(images.device)
    dist.barrier()
    return (time.perf_counter() - start) / cfg["steps"]


# ------------------------------------------------------------------------------------------ messages
def _message_cost(rank: int, model: nn.Module, images: torch.Tensor, ranges: list[range],
                  device: torch.device) -> dict[str, float]:
    """Latency and bandwidth between ranks 0 and 1 from ping-pongs of an empty and a boundary-sized message
    (buffers on ``device``, where the pipeline stages its messages); also the boundary activation's bytes (rank
    0's last module output)."""
    with torch.no_grad():
        x = model.prepare_inputs(images)
        for j in ranges[0]:
            x = model.local_modules[j](x)
    size = x.numel() * x.element_size()
    result = {"boundary_bytes": float(size)}
    for name, n in (("small", 1), ("large", x.numel())):
        buffer = torch.zeros(n, device=device)
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        for _ in range(10):
            if rank == 0:
                dist.send(buffer, 1)
                dist.recv(buffer, 1)
            elif rank == 1:
                dist.recv(buffer, 0)
                dist.send(buffer, 0)
        _sync(device)
        result[name] = (time.perf_counter() - start) / 20  # one way
    result["latency_s"] = result["small"]
    result["bytes_per_s"] = size / max(1e-9, result["large"] - result["small"])
    dist.barrier()
    return result


# --------------------------------------------------------------------------------------------- model
def _model_report(measured: dict, times: list[float], cfg: dict, predict: list[int]) -> dict[str, Any]:
    message = measured["message"]
    message_s = message["latency_s"] + message["boundary_bytes"] / message["bytes_per_s"]
    spec = parse_method(cfg["method"])
    wait = (measured["window"] - 1) if spec.cascade and cfg["boundary"] == "exact" else 0
    ranges = [range(a, b) for a, b in measured["ranges"]]
    tick = predicted_tick(times, ranges, message_s, wait)
    steps = cfg["steps"]
    fill = (steps + cfg["ranks"] - 1) / steps  # the window includes the pipeline's fill
    report: dict[str, Any] = {
        "message_s": message_s,
        "one_device_s": sum(times),
        "predicted_tick_s": tick,
        "predicted_s_per_step": tick * fill,
        "measured_s_per_step": measured["seconds_per_step"]["pipeline"],
        "predictions": {},
    }
    report["error"] = report["predicted_s_per_step"] / report["measured_s_per_step"] - 1
    for p in predict:
        if p > len(times):
            continue
        try:
            cut = partition_modules(times, p, max(1, wait))
        except ValueError:
            continue
        t = predicted_tick(times, cut, message_s, wait)
        report["predictions"][str(p)] = {"tick_s": t, "speedup_vs_one_device": sum(times) / t,
                                         "ranges": [(r.start, r.stop) for r in cut]}
    return report


def _memory_cells(p: dict) -> list[str]:
    if "params" not in p:  # a saved result from before the memory columns
        return ["—", "—", "—"]
    rss = f"{p['peak_rss_bytes'] / 2**20:.0f}" if "peak_rss_bytes" in p else "—"
    return [f"{p['params'] / 1e6:.3f} M", f"{p['peak_bytes'] / 2**20:.1f}", rss]


def _memory_rows(result: dict) -> list[list[str]]:
    one = result.get("one_process")
    if not one:
        return []
    return [["one process", f"0–{result['ranges'][-1][1] - 1}", "—", "—", *_memory_cells(one)]]


def _table(result: dict) -> str:
    s = result["seconds_per_step"]
    cfg = result["config"]
    rows = [
        [f"{cfg['method']} one process, {cfg['cores']} threads", f"{s['sequential']:.3f}", "1.00"],
        [f"{cfg['method']} pipeline, {cfg['ranks']} ranks", f"{s['pipeline']:.3f}",
         f"{s['sequential'] / s['pipeline']:.2f}"],
        [f"bp one process, {cfg['cores']} threads", f"{s['bp_sequential']:.3f}", "—"],
        [f"bp 1F1B, {cfg['ranks']} ranks", f"{s['bp_1f1b']:.3f}", f"{s['bp_sequential'] / s['bp_1f1b']:.2f} (vs bp)"],
    ]
    out = [common.format_table(["run", "s/step", "speed-up"], rows), ""]
    out.append(common.format_table(
        ["rank", "modules", "step s (median)", "waiting s", "parameters", "peak MiB", "peak RSS MiB"],
        [*_memory_rows(result), *[
            [r, f"{a}–{b - 1}", f"{p['step_s']:.3f}", f"{p['wait_s']:.3f}", *_memory_cells(p)]
            for r, ((a, b), p) in enumerate(zip(result["ranges"], result["per_rank"]))]]))
    kinds = {p.get("peak_kind") for p in result["per_rank"]} - {None}
    if kinds:
        how = {"accounted": "mlaan bench memory's exact accounting of live tensor storages",
               "cuda max_memory_allocated": "torch.cuda.max_memory_allocated"}
        out.append(f"parameters: those a rank trains (the rest released); peak: one training step after a warm-up "
                   f"one, by {' / '.join(how.get(k, k) for k in sorted(kinds))}; peak RSS: the rank's process at "
                   "that step (its host built the whole model once)")
    m = result["model"]
    out.append("")
    out.append(f"model: predicted {m['predicted_s_per_step']:.3f} s/step vs measured {m['measured_s_per_step']:.3f} "
               f"({m['error']:+.0%}); one device {m['one_device_s']:.3f} s; message {m['message_s'] * 1e3:.1f} ms")
    for p, v in m["predictions"].items():
        out.append(f"  P={p}: tick {v['tick_s']:.3f} s, {v['speedup_vs_one_device']:.2f}× one device")
    if s["sequential"] / s["pipeline"] > cfg["ranks"]:
        # P ranks on P cores can at most be P times faster: more means the one-process run was slowed by
        # something else (other processes on the cores, a thread team stalled by them)
        out.append(f"warning: a speed-up above {cfg['ranks']} with {cfg['ranks']} ranks cannot come from the "
                   f"pipeline; the one-process run was slowed by other load (load average "
                   f"{cfg['loadavg_before']:.1f} before, {cfg['loadavg_after']:.1f} after): measure on idle cores")
    return "\n".join(out)
