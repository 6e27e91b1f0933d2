"""One wording for a name that is not one of the allowed ones (a method, data set, architecture or choice).

Every such refusal says what was given, the closest allowed name when one is close (``dgl_mlaan`` → did you
mean ``dgl+mlaan``; ``CIFAR10`` → ``cifar10``), and the allowed names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def registered_spelling(name: object, known: Iterable[str]) -> str | None:
    """``name`` as ``known`` spells it, given in any case and with spaces around (``ResNet20`` → ``resnet20``,
    ``CIFAR10`` → ``cifar10``): the exact name first, else the first that differs only in case; None when none."""
    if not isinstance(name, str):
        return None
    known = list(known)
    if name in known:
        return name
    wanted = name.strip().lower()
    return next((key for key in known if key.lower() == wanted), None)


def closest(value: object, allowed: Iterable[str]) -> str | None:
    """The allowed name closest to ``value`` (ignoring case), or None when none is close (difflib ratio < 0.6)."""
    if not isinstance(value, str):
        return None
    by_lower = {name.lower(): name for name in allowed}
    match = difflib.get_close_matches(value.strip().lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[match[0]] if match else None


def unknown(what: str, value: object, allowed: Iterable[str], word: str = "available") -> str:
    """``"unknown method 'dgl_mlaan' (did you mean 'dgl+mlaan'?); available: bp, dgl, ..."``: the one-line message
    for a ValueError; ``word`` introduces the list ("available", "allowed")."""
    allowed = list(allowed)
    guess = closest(value, allowed)
    hint = f" (did you mean {guess!r}?)" if guess is not None else ""
    return f"unknown {what} {value!r}{hint}; {word}: {', '.join(allowed)}"
