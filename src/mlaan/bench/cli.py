"""Command-line entry points of the benchmarks: ``mlaan bench memory|speed|accuracy|pipeline|frontier`` and
``mlaan report``.

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


class DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: …)`` to an option's help unless the help already says its default, or there is none to
    say (None, False, an empty list); an option without help gets at least its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == [] or (
            action.default == argparse.SUPPRESS)
        if "default" in text.lower() or nothing or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()


# Help for the options the benchmark modules leave without one (argparse shows nothing for those).
_COMMON_HELP = {
    "arch": "architecture",
    "dataset": "data set",
    "batch": "images per training step",
    "batch_size": "images per training step",
    "seed": "random seed of the model and the data order",
}


def _fill_missing_help(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if action.help is None and action.option_strings:
            action.help = _COMMON_HELP.get(action.dest, action.dest.replace("_", " "))


# What ``register`` adds, with each command's one-line help: ``mlaan --help`` lists them from here and calls
# ``register`` (which imports the benchmarks, and torch) only when one of them runs or shows its own help.
COMMANDS = {
    "bench": "measure peak memory, step time, accuracy and module parallelism against BP",
    "report": "markdown table + plots from mlaan train runs",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` (memory, speed, accuracy, pipeline, frontier) and ``report`` to a CLI's subparsers."""
    from . import accuracy, frontier, memory, pipeline, report, speed

    fmt = DefaultsOnceFormatter
    bench = subparsers.add_parser(
        "bench", help=COMMANDS["bench"],
        description="Benchmarks of what MLAAN promises: memory, speed, accuracy (see BENCHMARKS.md).",
    )
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="{memory,speed,accuracy,pipeline,frontier}")
    bench_sub.required = True

    commands = (
        (memory, "memory", "peak training memory per method × K"),
        (speed, "speed", "step time vs BP beside FLOP floors"),
        (accuracy, "accuracy", "train every method, compare test error"),
        (pipeline, "pipeline", "module parallelism's step time vs one process and BP's 1F1B pipeline"),
        (frontier, "frontier", "every method × K × recompute setting: memory vs time vs BP, Pareto set marked"),
    )
    for module, name, summary in commands:
        p = bench_sub.add_parser(name, formatter_class=fmt, help=summary, description=module.__doc__.splitlines()[0])
        module.add_arguments(p)
        _fill_missing_help(p)
        p.set_defaults(func=_lazy(name))

    p = subparsers.add_parser("report", formatter_class=fmt, help=COMMANDS["report"],
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
