"""Throughput of data-parallel local learning at a fixed global batch: 1 process vs N torchrun processes.

    python scripts/bench_ddp.py --global-batch 64                                   # 1 process
    torchrun --standalone --nproc-per-node 2 scripts/bench_ddp.py --global-batch 64 # 2 processes, 32 each

Synthetic data, SGD steps exactly as the trainer does them (train_step, GradientAverager.wait, optimizer step,
EMA update). Rank 0 prints one JSON line: images/s over the timed steps, mean and median step time (the median
resists the odd step stalled by another tenant of a shared machine), the share of the time spent blocked in
``wait()`` (communication not hidden behind compute) and peak memory on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import mlaan
from mlaan import distributed as D
from mlaan.training.loop import make_optimizer, optimizer_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet32")
    ap.add_argument("--method", default="dgl+mlaan")
    ap.add_argument("-k", "--num-local-modules", type=int, default=16)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sync-bn", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    args = ap.parse_args()

    ctx = D.init_from_env(args.device)
    if args.global_batch % ctx.world_size:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {ctx.world_size} processes")
    per_rank = args.global_batch // ctx.world_size
    torch.manual_seed(0)
    model = mlaan.create_local_model(
        args.arch,
        method=args.method,
        num_local_modules=args.num_local_modules,
        num_classes=args.num_classes,
        image_size=args.image_size,
    )
    if args.amp != "none":
        model.autocast_dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
    D.prepare_model(model, ctx, sync_bn=args.sync_bn)
    averager = D.GradientAverager(model, ctx)
    opt = make_optimizer(model, lr=0.01, momentum=0.9, nesterov=False, weight_decay=0.0)
    size = model.backbone.image_size
    g = torch.Generator().manual_seed(1 + ctx.rank)
    x = torch.randn(per_rank, 3, size, size, generator=g).to(ctx.device)
    y = torch.randint(0, args.num_classes, (per_rank,), generator=g).to(ctx.device)

    def sync() -> None:
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)

    blocked, step_times = 0.0, []

    def wait() -> None:
        """The all-reduce wait, timed: what the step spends blocked on communication."""
        nonlocal blocked
        t0 = time.perf_counter()
        averager.wait()
        sync()
        blocked += time.perf_counter() - t0
    for step in range(args.warmup + args.steps):
        t_step = time.perf_counter()
        if step == args.warmup:
            sync()
            ctx.barrier()
            if ctx.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(ctx.device)
            start, blocked = time.perf_counter(), 0.0
        optimizer_step(model, opt, x, y, wait_for_gradients=wait)
        if step >= args.warmup:
            sync()
            step_times.append(time.perf_counter() - t_step)
    sync()
    ctx.barrier()
    elapsed = time.perf_counter() - start
    result = {
        "arch": args.arch,
        "method": args.method,
        "K": args.num_local_modules,
        "processes": ctx.world_size,
        "device": str(ctx.device),
        "threads_per_process": torch.get_num_threads(),
        "global_batch": args.global_batch,
        "sync_bn": args.sync_bn,
        "images_per_s": round(args.global_batch * args.steps / elapsed, 2),
        "step_s": round(elapsed / args.steps, 4),
        "median_step_s": round(statistics.median(step_times), 4),
        "images_per_s_at_median_step": round(args.global_batch / statistics.median(step_times), 2),
        "blocked_in_wait_share": round(blocked / elapsed, 4),
        "overlapped_buckets": averager.overlapped_buckets,
    }
    if ctx.device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(ctx.device) / 2**30, 3)
    summary = D.reduce_metrics({"images_per_s_rank_mean": result["images_per_s"]}, ctx)
    if ctx.is_main:
        result.update(summary)
        print(json.dumps(result), flush=True)
    D.cleanup(ctx)


if __name__ == "__main__":
    main()
