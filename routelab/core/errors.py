"""Error types. Every error names the offending argument and says how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RoutelabError(ValueError):
    """Base class of all routelab errors (a ``ValueError``, so generic handlers still work)."""


class ConfigError(RoutelabError):
    """A constructor argument or option is invalid."""


class InputError(RoutelabError):
    """A tensor passed at call time has the wrong shape, dtype or values."""


class UnknownNameError(ConfigError, KeyError):
    """A name (preset, part, option) is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """A ' Did you mean ...?' suffix listing the closest of ``choices`` (empty when none is close)."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def unknown_name(kind: str, argument: str, name: str, choices: Iterable[str]) -> UnknownNameError:
    """Build the error for an unknown ``name`` of some ``kind``, listing what exists."""
    choices = sorted(choices)
    return UnknownNameError(
        f"{argument}={name!r} is not a known {kind}.{suggest(name, choices)} "
        f"Known {kind}s: {', '.join(choices)}."
    )
