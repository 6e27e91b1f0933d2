"""Name → method class, and parsing of ``base+suffix`` names such as ``dgl+mlaan``."""

from __future__ import annotations

from dataclasses import dataclass

from .base import LocalMethod

_METHODS: dict[str, type[LocalMethod]] = {}
SUFFIXES = {
    "mlaan": "MLM + LAM: cascaded losses over a window, aux nets from copied later blocks with EMA twins",
    "mlm": "cascaded losses over a window, with the base method's plain head",
    "lam": "independent loss through copied later blocks with an EMA twin (Momentum Auxiliary Network)",
}


def register(cls: type[LocalMethod]) -> type[LocalMethod]:
    _METHODS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method name: the base method and which MLAAN parts are on."""

    name: str
    base: LocalMethod
    cascade: bool  # MLM
    leap: bool  # LAM

    @property
    def can_recompute(self) -> bool:
        """Whether ``grad_checkpointing`` has anything to recompute: aux nets made of backbone-like blocks (LAM,
        AugLocal) or module graphs kept alive for a cascade window (MLM)."""
        return self.leap or self.cascade or self.base.aux_blocks


def available_methods() -> list[str]:
    """Every accepted method name: each base, and each local base with each suffix."""
    names = []
    for name, cls in sorted(_METHODS.items(), key=lambda item: item[1].listing_order):
        names.append(name)
        if not cls.end_to_end:
            names.extend(f"{name}+{suffix}" for suffix in SUFFIXES)
    return names


def parse_method(name: str) -> MethodSpec:
    """``"dgl+mlaan"`` → MethodSpec(base=DGL, cascade=True, leap=True); ValueError for unknown names."""
    if not isinstance(name, str) or name.strip().lower() not in available_methods():
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    base_name, _, suffix = name.strip().lower().partition("+")
    base = _METHODS[base_name]()
    return MethodSpec(
        name=name.strip().lower(), base=base, cascade=suffix in ("mlaan", "mlm"), leap=suffix in ("mlaan", "lam")
    )
