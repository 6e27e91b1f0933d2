"""Command-line entry points of the benchmarks: ``mlaan bench memory|speed|accuracy`` and ``mlaan report``.

The main CLI (``mlaan.cli``) calls :func:`register` on its subparsers; ``python -m mlaan.bench.cli ...`` runs
the same commands on their own. Every parser sets ``func(args) -> int``; bad input raises ``ValueError``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _lazy(module: str, attr: str = "run"):
    """Import the benchmark module only when its command runs (keeps ``mlaan --help`` fast)."""

    def call(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(f"mlaan.bench.{module}"), attr)(args)

    return call


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` (memory, speed, accuracy) and ``report`` to a CLI's subparsers."""
    from . import accuracy, memory, report, speed

    fmt = argparse.ArgumentDefaultsHelpFormatter
    bench = subparsers.add_parser(
        "bench", help="measure peak memory, step time and accuracy of methods against BP",
        description="Benchmarks of what MLAAN promises: memory, speed, accuracy (see BENCHMARKS.md).",
    )
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="{memory,speed,accuracy}")
    bench_sub.required = True

    p = bench_sub.add_parser("memory", formatter_class=fmt, help="peak training memory per method × K",
                             description=memory.__doc__.splitlines()[0])
    memory.add_arguments(p)
    p.set_defaults(func=_lazy("memory"))

    p = bench_sub.add_parser("speed", formatter_class=fmt, help="step time vs BP beside FLOP floors",
                             description=speed.__doc__.splitlines()[0])
    speed.add_arguments(p)
    p.set_defaults(func=_lazy("speed"))

    p = bench_sub.add_parser("accuracy", formatter_class=fmt, help="train every method, compare test error",
                             description=accuracy.__doc__.splitlines()[0])
    accuracy.add_arguments(p)
    p.set_defaults(func=_lazy("accuracy"))

    p = subparsers.add_parser("report", formatter_class=fmt, help="markdown table + plots from mlaan train runs",
                              description=report.__doc__.splitlines()[0])
    report.add_arguments(p)
    p.set_defaults(func=_lazy("report"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlaan.bench.cli", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{bench,report}")
    sub.required = True
    register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
