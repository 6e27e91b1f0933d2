"""Name → method class, and parsing of ``base+suffix`` names such as ``dgl+mlaan``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...names import unknown
from ..engine_options import EngineOptions
from .base import LocalMethod

_METHODS: dict[str, type[LocalMethod]] = {}
SUFFIXES = {
    "mlaan": "MLM + LAM: cascaded losses over a window, aux nets from copied later blocks with EMA twins",
    "mlm": "cascaded losses over a window, with the base method's plain head",
    "lam": "independent loss through copied later blocks with an EMA twin (Momentum Auxiliary Network)",
}


def register(cls: type[LocalMethod]) -> type[LocalMethod]:
    """Class decorator: make ``cls`` available under ``cls.name`` (and with the ``+mlaan/+mlm/+lam`` suffixes).

    Raises ValueError for a name that is empty, has a ``+`` or is taken by another class, and for an ``Options``
    that is not a dataclass whose fields all have defaults, or that declares an option another method or the
    engine already declares (options are flat: one name, one meaning)."""
    name = cls.name
    if not isinstance(name, str) or not name or "+" in name or name != name.lower():
        raise ValueError(f"method class {cls.__qualname__} needs a lower-case name without '+', got {name!r}")
    previous = _METHODS.get(name)
    if previous is not None and previous.__qualname__ != cls.__qualname__:
        raise ValueError(f"method name {name!r} is taken by {previous.__module__}.{previous.__qualname__}")
    if cls.Options is not None:
        _check_options_class(cls)
    _check_head_options(cls)
    _METHODS[name] = cls
    return cls


def _check_options_class(cls: type[LocalMethod]) -> None:
    """A method's ``Options``: a dataclass, every field with a default, no name another method declares (a clash
    with an engine option is refused where both are collected, ``mlaan.engine.options.option_classes``)."""
    options = cls.Options
    if not dataclasses.is_dataclass(options):
        raise ValueError(f"{cls.__qualname__}.Options must be a dataclass")
    missing = [f.name for f in dataclasses.fields(options) if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{cls.__qualname__}.Options: option(s) {', '.join(missing)} need a default")
    owners: dict[str, str] = {}
    for other in _METHODS.values():
        if other.Options is not None and other.name != cls.name:
            owners.update({f.name: f"method {other.name!r}" for f in dataclasses.fields(other.Options)})
    taken = [f"{f.name} (declared by {owners[f.name]})" for f in dataclasses.fields(options) if f.name in owners]
    if taken:
        raise ValueError(f"{cls.__qualname__}.Options: option name(s) already in use: {', '.join(taken)}")


def _check_head_options(cls: type[LocalMethod]) -> None:
    """``head_options`` may name only the engine options an aux head reads (``"read_by": "head"``)."""
    allowed = [f.name for f in dataclasses.fields(EngineOptions) if f.metadata["read_by"] == "head"]
    wrong = [name for name in cls.head_options if name not in allowed]
    if wrong or isinstance(cls.head_options, str):
        raise ValueError(f"{cls.__qualname__}.head_options must be a tuple of engine options an aux head reads "
                         f"({', '.join(allowed)}); got {cls.head_options!r}")


def registered_methods() -> list[type[LocalMethod]]:
    """The registered method classes in listing order (baselines first)."""
    return sorted(_METHODS.values(), key=lambda cls: cls.listing_order)


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method name: the base method and which MLAAN parts are on."""

    name: str
    base: LocalMethod
    cascade: bool  # MLM
    leap: bool  # LAM

    @property
    def end_to_end(self) -> bool:
        """Whether the method trains end to end (BP): one module, no aux net; benchmarks compare against it."""
        return self.base.end_to_end

    @property
    def engine_options(self) -> frozenset[str]:
        """The engine options (:class:`~mlaan.engine.options.EngineOptions`) this method reads: those of each
        engine part it has (a field's ``"read_by"``: the split for every local method, MLM's cascade under
        +mlm/+mlaan, LAM's aux nets under +lam/+mlaan, recomputation where there is something to recompute, BP's
        checkpointed segments for an end-to-end method, the choice of trunk blocks where aux nets are made of
        blocks) and
        the aux-head options its base method lists in ``head_options``. The others change nothing in its run."""
        has = {"split": not self.end_to_end, "mlm": self.cascade, "lam": self.leap, "recompute": self.can_recompute,
               "e2e_recompute": self.end_to_end, "local_recompute": self.can_recompute and not self.end_to_end,
               "trunk_recompute": self.leap or self.base.aux_blocks,
               "head": False, "loss": True,
               "step": True}
        by_part = {f.name for f in dataclasses.fields(EngineOptions) if has[f.metadata["read_by"]]}
        return frozenset(by_part | set(self.base.head_options))

    @property
    def can_recompute(self) -> bool:
        """Whether ``grad_checkpointing`` has anything to recompute: aux nets made of backbone-like blocks (LAM,
        AugLocal), module graphs kept alive for a cascade window (MLM), or an end-to-end method's (BP's) backbone
        (activation checkpointing, the baseline for memory)."""
        return self.leap or self.cascade or self.base.aux_blocks or self.end_to_end


def available_methods() -> list[str]:
    """Every accepted method name: each base, and each local base with each suffix."""
    names = []
    for cls in registered_methods():
        name = cls.name
        names.append(name)
        if not cls.end_to_end:
            names.extend(f"{name}+{suffix}" for suffix in SUFFIXES)
    return names


def parse_method(name: str) -> MethodSpec:
    """``"dgl+mlaan"`` → MethodSpec(base=DGL, cascade=True, leap=True); ValueError for unknown names."""
    if not isinstance(name, str) or name.strip().lower() not in available_methods():
        raise ValueError(unknown("method", name, available_methods()))
    base_name, _, suffix = name.strip().lower().partition("+")
    base = _METHODS[base_name]()
    return MethodSpec(
        name=name.strip().lower(), base=base, cascade=suffix in ("mlaan", "mlm"), leap=suffix in ("mlaan", "lam")
    )
