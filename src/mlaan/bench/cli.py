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

    commands = (
        (memory, "memory", "peak training memory per method × K"),
        (speed, "speed", "step time vs BP beside FLOP floors"),
        (accuracy, "accuracy", "train every method, compare test error"),
    )
    for module, name, summary in commands:
        p = bench_sub.add_parser(name, formatter_class=fmt, help=summary, description=module.__doc__.splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(func=_lazy(name))

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
