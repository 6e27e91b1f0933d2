"""The flags of ``mlaan train``, each derived from its option's one declaration: the run's options from
:class:`mlaan.training.config.RunConfig` (:func:`~mlaan.training.config.run_field`), a data set's own from the
data-set registry, the engine's and each method's from :func:`mlaan.engine.options.option_fields`.

Every flag is ``--field-name`` (dest ``field_name``), typed by the field, with ``default=SUPPRESS``: only flags
given explicitly reach the config, so they override a ``--config`` file. Torch-free, for a fast ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

if TYPE_CHECKING:
    from .training.config import TrainConfig

# Errors that mean "the input is wrong": `mlaan` reports them in one line, exit 2.
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, yaml.YAMLError)
# parsed `mlaan train` arguments that are not options of the run
NOT_CONFIG = ("config", "resume", "print_config", "func", "command")


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Add every flag of ``mlaan train`` to ``parser``, in the groups of :data:`~mlaan.training.config.GROUPS`
    (each method's options in a group of its own after "model and method")."""
    from .training.config import GROUPS

    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="YAML file of options (flags override it; 'base: FILE' builds on other files)")
    parser.add_argument("--print-config", dest="print_config", action="store_true",
                        help="print the run's resolved options as YAML (a config file) and exit; trains and writes "
                             "nothing")
    for key, title in GROUPS.items():
        group = parser.add_argument_group(title)
        _add_run_flags(group, key)
        if key == "model":
            _add_option_flags(parser, group)
        if key == "output":
            group.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                               help="continue from PATH (a checkpoint, or a run folder: its last.pt), or from "
                                    "<output-dir>/last.pt when no PATH is given")


def _add_run_flags(group, key: str) -> None:
    """A flag for every run option of group ``key`` (:data:`mlaan.training.config.GROUPS`), from its declaration
    (:func:`mlaan.training.config.run_field`): ``--field-name`` typed by the field, with its help and default.
    Only flags given explicitly reach the config (``default=SUPPRESS``), so they override a --config file."""
    from .training.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("group") != key:  # another group's, a config key only (extra), or an engine/method option
            continue
        meta = dict(f.metadata)
        if meta.get("data_set_option"):  # a data set's own option: its help and metavar are the registry's
            meta.update(_data_set_option(f.name))
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": meta["help"].format(default=f.default)}
        kwargs.update({k: meta[k] for k in ("metavar", "choices") if meta.get(k) is not None})
        hint = _without_none(hints[f.name])
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is tuple:
            kwargs.update(type=float, nargs=len(typing.get_args(hint)))
        elif hint is not str:
            kwargs["type"] = hint
        flags = ["--" + f.name.replace("_", "-")] + ([meta["short"]] if meta.get("short") else [])
        group.add_argument(*flags, **kwargs)


def _without_none(hint: Any) -> Any:
    """``X`` for ``X | None``, else ``hint``: the flag's type (None is the unset default, not a value to give)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


def _data_set_option(key: str) -> dict[str, str]:
    """The help (``{default}`` standing for the default) and metavar of a data set's option, config key ``key``,
    as the data-set registry declares it (:class:`mlaan.data.DatasetOption`)."""
    from .data import registered_datasets

    for spec in registered_datasets():
        for option in spec.options:
            if spec.option_key(option) == key:
                return {"help": f"{spec.name}: {option.help} (default: {{default}})", "metavar": option.metavar}
    raise KeyError(f"no data set declares the option {key!r}")


def _add_option_flags(parser: argparse.ArgumentParser, engine_group) -> None:
    """A flag ``--field-name`` for every declared option (engine's in ``engine_group``, each method's in a group
    of its own), typed and with its help and default, from the one declaration
    (:func:`mlaan.engine.options.option_fields`). Values are checked where the option is declared."""
    from .engine.options import who_reads
    from .training.config import OPTION_FIELDS

    groups = {"engine": engine_group}
    for f in OPTION_FIELDS:
        if f.owner not in groups:
            groups[f.owner] = parser.add_argument_group(f"{f.owner} options")
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        reader = f"{who_reads(f.name)}; " if f.owner == "engine" else ""  # a method's options have their group
        # square brackets: the reader often says "(+mlm, +mlaan)", and the help may end in parentheses of its own
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": f"{f.help} [{reader}default: {default}]"}
        if f.metavar is not None:
            kwargs["metavar"] = f.metavar
        if f.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(f.type) is tuple:
            items = typing.get_args(f.type)
            kwargs.update(type=float, nargs="+" if Ellipsis in items else len(items))
        else:
            kwargs["type"] = f.type
        flag = "--" + f.name.replace("_", "-")
        groups[f.owner].add_argument(flag, **kwargs)


class _RaisingParser(argparse.ArgumentParser):
    """``mlaan train``'s parser for a command line checked by another command: a usage error is a ValueError."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(" ".join(str(message).split()))


def train_options_given(argv: Sequence[str]) -> set[str]:
    """The options (by name: ``local_modules`` for ``-K`` or an abbreviation of ``--local-modules``) that the
    `mlaan train` flags ``argv`` set. ValueError where `mlaan train` would refuse them as flags."""
    parser = _RaisingParser(prog="mlaan train")
    add_train_flags(parser)  # its options default to "not given", so what the namespace holds was given
    return {name for name, value in vars(parser.parse_args(list(argv))).items() if value not in (None, False)}


def resolve_train_args(argv: Sequence[str]) -> TrainConfig:
    """The options ``mlaan train ARGV`` would start a new run with, resolved as ``--print-config`` resolves them
    (:func:`mlaan.training.resolve_run`: files read, no data opened, nothing written or trained, no warning
    printed). ValueError (or another of :data:`INPUT_ERRORS`), one line, where `mlaan train` would refuse them
    before it builds anything: an unknown flag, a bad value, options that cannot go together. For a command that
    starts `mlaan train` runs (``mlaan bench accuracy``) to check every run's flags before the first starts."""
    from .training import resolve_run

    parser = _RaisingParser(prog="mlaan train")
    add_train_flags(parser)
    args = parser.parse_args(list(argv))
    overrides = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}
    config, _, _ = resolve_run(args.config, overrides, None, check_data=False, warn=False)
    return config
