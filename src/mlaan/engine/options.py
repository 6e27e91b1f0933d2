"""Options of the engine and of every method, each declared once.

An option is a field of a dataclass: the engine's own in :class:`EngineOptions` below, a method's in the
``Options`` dataclass of its :class:`~mlaan.engine.methods.LocalMethod` subclass. A field has a default and
``metadata={"help": ...}`` (an engine option also names the part of a method that reads it, ``"read_by"``, see
:data:`READERS`; an option read only for some values of another names them, ``"read_when"``); its checks live
in that dataclass's ``__post_init__`` (raising ValueError). From those declarations come the keyword options
of ``create_local_model``, the flags of ``mlaan train``, the keys of its YAML configs, the ``config`` of
``metrics.json`` and the checkpoint, what ``--resume`` compares and which given options a run warns it ignores.

A field with ``metadata={"derived": "..."}`` is set by ``mlaan train`` from other settings (the data set's
normalisation, the batch size) and is not a flag or config key of its own.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..names import registered_spelling
from .engine_options import (  # noqa: F401  (re-exported: the engine's options are part of every option)
    AUX_HEAD_SHAPES,
    BALANCE_MODES,
    EMA_UPDATE_MODES,
    READERS,
    EngineOptions,
    check_choices,
)


# --------------------------------------------------------------------------------------------- all options
@dataclass(frozen=True)
class OptionField:
    """One declared option: its name, type (resolved), default, help, owner ("engine" or a method's name) and
    whether ``mlaan train`` derives it instead of taking it as a flag."""

    name: str
    type: Any
    default: Any
    help: str
    owner: str
    derived: bool
    metavar: str | tuple[str, ...] | None = None  # how ``--help`` names the value(s)
    read_when: dict[str, tuple[Any, ...]] | None = None  # read only while these options hold one of these values
    choices: tuple[str, ...] | None = None  # the allowed names, taken in any case (engine_options.check_choices)


def option_classes() -> list[tuple[str, type]]:
    """``[("engine", EngineOptions), (method name, its Options), ...]`` in the methods' listing order."""
    from .methods.registry import registered_methods

    found = [("engine", EngineOptions)]
    found += [(cls.name, cls.Options) for cls in registered_methods() if cls.Options is not None]
    engine = {f.name for f in dataclasses.fields(EngineOptions)}
    for name, cls in found[1:]:
        clash = sorted(engine & {f.name for f in dataclasses.fields(cls)})
        if clash:
            raise ValueError(f"method {name!r} declares option(s) the engine already has: {', '.join(clash)}")
    return found


def option_fields(include_derived: bool = True) -> list[OptionField]:
    """Every declared option (engine's first, then each method's)."""
    result = []
    for owner, cls in option_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            derived = "derived" in f.metadata
            if derived and not include_derived:
                continue
            result.append(OptionField(f.name, hints[f.name], f.default, f.metadata.get("help", ""), owner, derived,
                                      f.metadata.get("metavar"), f.metadata.get("read_when"),
                                      f.metadata.get("choices")))
    return result


def options_unused_by(method: str) -> frozenset[str]:
    """The declared options that ``method`` never reads: another method's (each option knows its declaring
    method, ``OptionField.owner``) and the engine's that none of its parts reads
    (:attr:`~mlaan.engine.methods.MethodSpec.engine_options`: ``window`` without a cascade, say). ValueError for
    an unknown method."""
    from .methods.registry import parse_method

    spec = parse_method(method)
    return frozenset(f.name for f in option_fields()
                     if (f.name not in spec.engine_options if f.owner == "engine" else f.owner != spec.base.name))


def spelled(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with each option declared with ``choices`` as the option spells it, given in any case (``MLP``
    → ``mlp``); every other value, and a choice that is not allowed (for the option's own check), as it is."""
    choices = {f.name: f.choices for f in option_fields() if f.choices}
    return {k: registered_spelling(v, choices[k]) or v if k in choices else v for k, v in values.items()}


def options_ignored(method: str, values: dict[str, Any]) -> frozenset[str]:
    """The options a run of ``method`` with these option ``values`` (missing ones at their defaults) ignores:
    those ``method`` never reads (:func:`options_unused_by`) and those read only for values of another option
    that it does not hold (``aux_width`` with ``aux_head="linear"``, ``temperature`` with
    ``infopro_task="ce"``). A condition on an option ``method`` never reads does not apply: a plug-in head that
    reads ``aux_width`` but not ``aux_head`` reads it whatever ``aux_head`` says. For warnings; ValueError for an
    unknown method."""
    fields = option_fields()
    unused = options_unused_by(method)
    values = spelled(values)
    return unused | {f.name for f in fields if _unmet_conditions(f, values, fields, unused)}


def why_ignored(name: str, method: str, values: dict[str, Any]) -> str:
    """Why a run of ``method`` with option ``values`` ignores option ``name`` (one of :func:`options_ignored`),
    for warnings: who reads it when ``method`` never does, else the value of the other option it needs."""
    unused = options_unused_by(method)
    if name in unused:
        return who_reads(name)
    fields = option_fields()
    field_ = next(f for f in fields if f.name == name)
    values = spelled(values)
    return unmet_text(_unmet_conditions(field_, values, fields, unused))


def unmet_text(unmet: Iterable[tuple[str, tuple[Any, ...], Any]]) -> str:
    """``read only with opt=adamw, this run has opt=sgd``: unmet ``read_when`` conditions (other option, values it
    must hold, value it holds) as a warning says them, for engine and run options alike."""
    return "; ".join(f"read only with {other}={' or '.join(map(str, allowed))}, this run has {other}={held}"
                     for other, allowed, held in unmet)


def _unmet_conditions(field_: OptionField, values: dict[str, Any], fields: list[OptionField],
                      unused: frozenset[str]) -> list[tuple[str, tuple[Any, ...], Any]]:
    """``(other option, values it must hold, value it holds)`` for each ``read_when`` condition of ``field_`` that
    ``values`` (missing options at their defaults, from ``fields``) does not meet; conditions on the ``unused``
    options (those the method never reads) do not apply."""
    unmet = []
    for other, allowed in (field_.read_when or {}).items():
        if other in unused:
            continue
        held = values[other] if other in values else next(f.default for f in fields if f.name == other)
        if held not in allowed:
            unmet.append((other, allowed, held))
    return unmet


def who_reads(name: str) -> str:
    """Who reads option ``name``: "an option of method M", or the engine part (or the aux heads) that reads it
    (for warnings and ``--help``). KeyError for an unknown name."""
    field_ = {f.name: f for f in option_fields()}[name]
    when = "".join(f" (only with {other}={' or '.join(map(str, allowed))})"
                   for other, allowed in (field_.read_when or {}).items())
    if field_.owner != "engine":
        return f"an option of method {field_.owner}{when}"
    read_by = EngineOptions.__dataclass_fields__[name].metadata["read_by"]
    if read_by == "head":
        from .methods.registry import registered_methods

        readers = [cls.name for cls in registered_methods() if name in cls.head_options]
        return f"read by the aux heads of {', '.join(readers) or 'no built-in method'}{when}"
    return f"read by {READERS[read_by]}{when}"


class LocalOptions:
    """Every option of the engine and of the registered methods, flat: ``options.window``,
    ``options.temperature``, ... (what a method's ``make_head`` reads as ``ctx.options.<field>``).

    Built from keyword options; an unknown name, a non-finite number or a value its declaring dataclass refuses
    raises ValueError (one line, naming the value and what is allowed).
    """

    def __init__(self, **values: Any) -> None:
        classes = option_classes()
        known = [f.name for _, cls in classes for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        hints = {name: hint for _, cls in classes for name, hint in typing.get_type_hints(cls).items()}
        values = spelled({k: checked_type(k, v, hints[k]) for k, v in values.items()})
        check_finite(values)
        parts = []
        for _, cls in classes:
            names = {f.name for f in dataclasses.fields(cls)}
            parts.append(cls(**{k: v for k, v in values.items() if k in names}))
            check_choices(parts[-1])  # what a class declares with choices is checked, whatever its __post_init__
        object.__setattr__(self, "_parts", parts)

    def _owner(self, name: str) -> object | None:
        for part in self.__dict__.get("_parts", ()):
            if name in part.__dataclass_fields__:
                return part
        return None

    def __getattr__(self, name: str) -> Any:
        part = self._owner(name)
        if part is None:
            raise AttributeError(f"no option {name!r}")
        return getattr(part, name)

    def __setattr__(self, name: str, value: Any) -> None:
        part = self._owner(name)
        if part is None:
            raise AttributeError(f"no option {name!r}")
        setattr(part, name, value)

    def to_dict(self) -> dict[str, Any]:
        """Every option's value, by name."""
        return {k: v for part in self._parts for k, v in dataclasses.asdict(part).items()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalOptions) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return "LocalOptions(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"


class HeadOptions:
    """What a method's ``make_head`` reads as ``ctx.options``: a read-only view of a :class:`LocalOptions` that
    holds the method's own options and the engine options it lists in ``head_options``, so that what a method
    declares it reads is what it reads (``mlaan train --resume`` compares only those). Any other name raises
    AttributeError naming the option and the declaration it needs."""

    def __init__(self, options: LocalOptions, method: type) -> None:
        own = {f.name for f in dataclasses.fields(method.Options)} if method.Options is not None else set()
        object.__setattr__(self, "_options", options)
        object.__setattr__(self, "_method", method)
        object.__setattr__(self, "_readable", frozenset(own | set(method.head_options)))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # copy/pickle probe a half-built instance for dunders and our own attributes
            raise AttributeError(name)
        if name in self._readable:
            return getattr(self._options, name)
        method = self._method
        raise AttributeError(
            f"method {method.name!r} reads option {name!r} in make_head without declaring it: a method reads its "
            f"own Options and the engine options it lists in {method.__qualname__}.head_options (readable here: "
            f"{', '.join(sorted(self._readable)) or 'none'})")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"ctx.options is read-only (setting {name!r})")


def checked_type(name: str, value: Any, hint: Any) -> Any:
    """``value`` as option ``name`` of type ``hint`` holds it: an int for a float is a float, a list for a tuple a
    tuple; anything else of the wrong type (a string for a number, say) raises a one-line ValueError naming the
    option, the value and the type it needs."""
    wanted: str
    if hint is bool:
        ok, wanted = isinstance(value, bool), "True or False"
    elif hint is int:  # numbers.Integral takes numpy's integers too (a sweep over np.arange, say)
        ok, wanted = isinstance(value, numbers.Integral) and not isinstance(value, bool), "an integer"
        value = int(value) if ok else value
    elif hint is float:
        ok, wanted = isinstance(value, numbers.Real) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif hint is str:
        ok, wanted = isinstance(value, str), "a string"
    elif typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        item = items[0]
        length = None if Ellipsis in items else len(items)
        wanted = (f"a list of {length} " if length else "a list of ") + ("integers" if item is int else "numbers")
        ok = isinstance(value, (list, tuple)) and (length is None or len(value) == length)
        if ok:
            try:
                value = tuple(checked_type(name, v, item) for v in value)
            except ValueError:
                ok = False
    else:  # a type the declarations do not use yet: its dataclass checks it
        return value
    if not ok:
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return value


def check_finite(values: dict[str, Any]) -> None:
    """ValueError for a nan/inf number (alone or in a tuple): it would slip through every range check."""
    for name, value in values.items():
        numbers = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ValueError(f"{name} must be a finite number, got {value}")


def make_options(**options: Any) -> LocalOptions:
    """:class:`LocalOptions` from keyword options (lists are taken as tuples); ValueError as there."""
    return LocalOptions(**options)
