"""`mlaan bench accuracy`: train every method on Fashion-MNIST with the same seed, recipe and epoch budget.

Each method is one `mlaan train` subprocess (``python -m mlaan train --method M ... --output-dir RUN/M``),
run one after the other; the results table (test error, Δ vs BP, Δ vs the base method) and the learning
curves come from the runs' ``metrics.jsonl``/``metrics.json`` through :mod:`mlaan.bench.report`. A method whose
run already finished in the output folder is not trained again (``--force`` retrains), so an interrupted
benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from . import common, report

ACCURACY_METHODS = ("bp", "dgl", "dgl+mlaan", "infopro", "infopro+mlaan", "dgl+mlm", "dgl+lam")


def train_command(args: argparse.Namespace, method: str, run_dir: Path) -> list[str]:
    """The `mlaan train` command line of one method (every method gets the same recipe)."""
    cmd = [
        sys.executable, "-m", "mlaan", "train",
        "--method", method,
        "--arch", args.arch,
        "--local-modules", str(1 if method == "bp" else args.k),
        "--dataset", args.dataset,
        "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size),
        "--lr", str(args.lr),
        "--warmup-epochs", str(args.warmup_epochs),
        "--seed", str(args.seed),
        "--output-dir", str(run_dir),
    ]
    if args.train_samples and args.train_samples > 0:
        cmd += ["--train-samples", str(args.train_samples)]
    if args.test_samples:
        cmd += ["--test-samples", str(args.test_samples)]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    if args.device:
        cmd += ["--device", args.device]
    if args.force:
        cmd += ["--overwrite"]
    for extra in args.train_arg or []:
        cmd += extra.split()
    return cmd


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=",".join(ACCURACY_METHODS), help="comma-separated methods")
    p.add_argument("--arch", default="resnet32")
    p.add_argument("--k", type=int, default=16, help="local modules K (BP always 1)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=3, help="epoch budget of every method")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (SGD, Nesterov, cosine)")
    p.add_argument("--warmup-epochs", type=float, default=0.2, help="linear warm-up before the cosine decay")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-samples", type=int, default=15000,
                   help="train on the first N training images (0: all 60000); the default budget, 3 epochs of "
                        "15000 images for 7 methods, took 50 minutes on 2 CPU cores (BENCHMARKS.md)")
    p.add_argument("--test-samples", type=int, default=None, help="test on the first N test images")
    p.add_argument("--data-root", default=None, help="data folder passed to `mlaan train`")
    p.add_argument("--device", default=None, help="auto, cpu or cuda, passed to `mlaan train`")
    p.add_argument("--train-arg", action="append", metavar="'--flag value'",
                   help="extra argument(s) passed to every `mlaan train` (repeatable)")
    p.add_argument("--force", action="store_true", help="retrain methods whose run already finished")
    p.add_argument("--output-dir", default=None, help="(default: runs/bench-accuracy)")


def run(args: argparse.Namespace) -> int:
    methods = common.parse_methods(args.methods)
    common.check_arch(args.arch)
    for name, value in (("--k", args.k), ("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    out = common.output_dir(args.output_dir, "accuracy")
    machine = common.machine_description() + f"; code {common.code_version()}"
    print(f"mlaan bench accuracy on {machine}: {', '.join(methods)}; {args.arch} K={args.k}, {args.dataset}, "
          f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, seed {args.seed}", flush=True)
    run_dirs, failures = [], []
    for method in methods:
        run_dir = out / method.replace("+", "_")
        if (run_dir / "metrics.json").exists() and not args.force:
            print(f"  {method}: finished earlier in {run_dir}, kept", flush=True)
            run_dirs.append(run_dir)
            continue
        cmd = train_command(args, method, run_dir)
        print(f"  {method}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        log_path = out / f"{method.replace('+', '_')}.log"
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not (run_dir / "metrics.json").exists():
            tail = log_path.read_text().strip().splitlines()[-3:]
            failures.append(method)
            print(f"  {method}: FAILED (exit {proc.returncode}): {' | '.join(tail)}", flush=True)
            continue
        final = json.loads((run_dir / "metrics.json").read_text())
        print(f"  {method}: test accuracy {100 * final['test_accuracy']:.2f}% in {time.perf_counter() - t0:.0f}s",
              flush=True)
        run_dirs.append(run_dir)
    if not run_dirs:
        raise RuntimeError("every training run failed; see the logs in " + str(out))
    result = report.write_report(run_dirs, out, title=f"{args.dataset}, {args.arch} K={args.k}, "
                                                       f"{args.epochs} epochs, seed {args.seed}")
    summary = {
        "machine": machine,
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "failed": failures,
        "runs": [{k: v for k, v in r.items() if k != "epochs"} | {"epochs": r["epochs"]} for r in result["runs"]],
    }
    common.write_json(out / "accuracy.json", summary)
    print("\n" + result["table"], flush=True)
    print(f"\nwrote {out / 'accuracy.json'}, " + ", ".join(result["files"]), flush=True)
    return 1 if failures else 0
