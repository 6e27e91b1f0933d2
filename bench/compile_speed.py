"""Step time of ``compile=True`` (torch.compile of each local module and aux net, mlaan.engine.compile) against
eager, interleaved (mlaan.bench.speed.interleaved_times: rounds that time every entry once, the order rotating).

    OMP_NUM_THREADS=1 nice python bench/compile_speed.py --cases bp:resnet32:1,dgl+mlaan:resnet32:16 --batch 64

The first compiled steps (compilation) are warm-up, reported apart; both models start from the same weights and
see the same batch. Prints one JSON line per case."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import mlaan
from mlaan.bench.speed import _timed_step, interleaved_times
from mlaan.engine.compile import compile_step_parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="bp:resnet32:1,dgl+mlaan:resnet32:16", help="METHOD:ARCH:K,...")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each (the compiled one's compile them)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--channels-last", action="store_true", help="both models and batches channels-last")
    args = p.parse_args()
    torch.set_num_threads(1)
    for case in args.cases.split(","):
        method, arch, k = case.split(":")
        torch.manual_seed(0)
        eager = mlaan.create_local_model(arch, method, int(k)).train().set_channels_last(args.channels_last)
        compiled = copy.deepcopy(eager)
        compile_step_parts(compiled, backend=args.backend)
        g = torch.Generator().manual_seed(0)
        x = eager.prepare_inputs(torch.randn(args.batch, 3, 32, 32, generator=g))
        y = torch.randint(0, 10, (args.batch,), generator=g)
        steps = {}
        for name, model in (("eager", eager), ("compiled", compiled)):
            opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.01, momentum=0.9)
            steps[name] = (model, opt, x, y)
        t0 = time.perf_counter()
        _timed_step(*steps["compiled"])  # compiles every part
        first = time.perf_counter() - t0
        times, _, cpu = interleaved_times(steps, args.warmup, args.repeats)
        med = {n: statistics.median(v) for n, v in times.items()}
        med_cpu = {n: statistics.median(v) for n, v in cpu.items()}
        print(json.dumps({"case": case, "batch": args.batch, "backend": args.backend,
                          "channels_last": args.channels_last, "first_compiled_step_s":
                          round(first, 1), "median_step_s": {n: round(v, 4) for n, v in med.items()},
                          "median_cpu_s": {n: round(v, 4) for n, v in med_cpu.items()},
                          "compiled_over_eager_wall": round(med["compiled"] / med["eager"], 3),
                          "compiled_over_eager_cpu": round(med_cpu["compiled"] / med_cpu["eager"], 3)}),
              flush=True)


if __name__ == "__main__":
    main()
