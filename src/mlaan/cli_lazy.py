"""Subcommands that other modules contribute to ``mlaan`` (the benchmarks: ``mlaan.bench.cli.register``), listed
in ``mlaan --help`` at once but built only when used.

Building them imports the benchmarks and torch (seconds); listing them from their one-line summaries does not,
so ``mlaan --help`` and ``mlaan train --help`` import no torch. argparse has no public hook for a subcommand
built on demand: its ``add_subparsers(action=...)`` takes a subclass of ``argparse._SubParsersAction``, whose
name -> parser map and help lines (``_name_parser_map``, ``_choices_actions``, ``_ChoicesPseudoAction``) are
private. That reliance is kept here, in one small module, rather than in the command's parsing and dispatch.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Mapping
from typing import Any


class DeferredCommands(argparse._SubParsersAction):
    """The subcommands, where contributed ones can be *deferred*: listed in the help from their one-line summaries
    and built (by their ``register``, which imports the benchmarks and torch) only when one of them is parsed or
    the list of parsers is walked. So ``mlaan --help`` and ``mlaan train --help`` import no torch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: dict[str, argparse.Action] = {}  # deferred name -> its line in the help
        self._loader: Callable[[DeferredCommands], None] | None = None
        self._name_parser_map = self.choices = _Parsers(self)

    def defer(self, summaries: Mapping[str, str], load: Callable[[DeferredCommands], None]) -> None:
        """List ``summaries`` (name -> help) now; ``load(self)`` adds their parsers when first needed."""
        for name, text in summaries.items():
            self._pending[name] = self._ChoicesPseudoAction(name, (), text)
            self._choices_actions.append(self._pending[name])
        self._loader = load

    def is_pending(self, name: str) -> bool:
        """Whether ``name`` is a deferred subcommand not built yet."""
        return name in self._pending

    def load(self) -> None:
        """Build the deferred subcommands (their own help lines replace the summaries)."""
        load, self._loader = self._loader, None
        if load is None:
            return
        for line in self._pending.values():
            self._choices_actions.remove(line)
        self._pending.clear()
        load(self)


class _Parsers(dict):
    """Name -> parser of a :class:`DeferredCommands`: knows the deferred names, and builds them on first lookup."""

    def __init__(self, owner: DeferredCommands) -> None:
        super().__init__()
        self._owner = owner

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or (isinstance(name, str) and self._owner.is_pending(name))

    def __len__(self) -> int:
        return super().__len__() + len(self._owner._pending)

    def __getitem__(self, name: str) -> argparse.ArgumentParser:
        if not super().__contains__(name):
            self._owner.load()
        return super().__getitem__(name)

    def get(self, name: str, default: Any = None) -> Any:
        if not super().__contains__(name):
            self._owner.load()
        return super().get(name, default)

    def __iter__(self) -> Iterator[str]:
        self._owner.load()
        return super().__iter__()

    def keys(self) -> Any:
        self._owner.load()
        return super().keys()

    def values(self) -> Any:
        self._owner.load()
        return super().values()

    def items(self) -> Any:
        self._owner.load()
        return super().items()


def add_contributed(subparsers: DeferredCommands, catalogue: Callable[[], str]) -> None:
    """Add the subcommands of ``mlaan.bench.cli`` (when that module exists) to ``subparsers``: deferred when it
    lists them (``COMMANDS``: name -> one-line help), else built now; each parser without an epilog gets
    ``catalogue()`` (the data sets, architectures and methods) as its epilog."""
    bench = _bench_cli()
    if bench is None:
        return

    def contribute(commands: argparse._SubParsersAction) -> None:
        bench.register(commands)
        _add_catalogue(commands, catalogue)  # contributed subcommands list the choices too

    if isinstance(getattr(bench, "COMMANDS", None), Mapping):
        subparsers.defer(bench.COMMANDS, contribute)  # built when used: their modules import torch
    else:
        contribute(subparsers)


def _raw_description(formatter: type[argparse.HelpFormatter]) -> type[argparse.HelpFormatter]:
    """``formatter`` that keeps the epilog's line breaks (the catalogue is a list)."""
    if issubclass(formatter, argparse.RawDescriptionHelpFormatter):
        return formatter
    if formatter is argparse.HelpFormatter:
        return argparse.RawDescriptionHelpFormatter
    return type(f"Raw{formatter.__name__}", (formatter, argparse.RawDescriptionHelpFormatter), {})


def _add_catalogue(subparsers: argparse._SubParsersAction, catalogue: Callable[[], str]) -> None:
    """Give every subcommand parser without an epilog the list of data sets, architectures and methods."""
    for sub in subparsers.choices.values():
        if sub.epilog is None:
            sub.epilog = catalogue()
            sub.formatter_class = _raw_description(sub.formatter_class)
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_catalogue(action, catalogue)


def _bench_cli():
    """``mlaan.bench.cli`` when that module exists (its subcommands join this command)."""
    try:
        from .bench import cli as bench_cli
    except ModuleNotFoundError as err:
        if err.name in ("mlaan.bench.cli", "mlaan.bench"):
            return None
        raise
    return bench_cli if hasattr(bench_cli, "register") else None
