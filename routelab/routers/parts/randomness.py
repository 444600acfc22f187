"""Seedable randomness for router parts.

A part given ``seed=None`` draws from torch's global generator (so ``torch.manual_seed``
reproduces it); with an integer seed it owns private generators, one per device, created
on first use. Either way every random draw goes through a ``torch.Generator``.
"""

from __future__ import annotations

import torch


class RandomSource:
    """Per-part random number generators keyed by device."""

    def __init__(self, seed: int | None = None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            from routelab.core.errors import ConfigError

            raise ConfigError(f"seed must be an integer or None, got {seed!r}.")
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        if self.seed is None:
            return None
        key = str(torch.device(device))
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def uniform(self) -> float:
        """One draw of U(0, 1) (on the CPU)."""
        return float(torch.rand((), generator=self.generator("cpu")))

    def normal_like(self, t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=self.generator(t.device), device=t.device, dtype=t.dtype)

    def randperm(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.randperm(n, generator=self.generator(device), device=device)
