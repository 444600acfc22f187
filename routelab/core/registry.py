"""A small name -> entry registry whose lookups suggest the closest names on a miss."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from routelab.core.errors import ConfigError, unknown_name

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by unique name, in registration order."""

    def __init__(self, kind: str, argument: str) -> None:
        self.kind = kind
        self.argument = argument
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ConfigError(f"{self.kind} {name!r} is already registered.")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise unknown_name(self.kind, self.argument, name, self._entries)
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
