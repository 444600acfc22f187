"""The depth-stack interface: a module that runs a TinyLM's blocks with per-token (or
per-sequence) decisions to execute, skip, approximate or repeat them.

A ``DepthStack`` owns only its routers and extra modules; the blocks stay in the model.
``forward(blocks, x, ...)`` returns the new hidden states and a ``DepthResult``. Each stack
has named ``modes`` (how it decides: the training rule, a causal inference rule, fixed
baselines); ``train()``/``eval()`` switch between ``train_mode`` and ``eval_mode`` unless
``use_mode`` pins one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from routelab.core.context import RoutingContext
from routelab.core.errors import ConfigError
from routelab.depth.result import DepthResult


class DepthStack(nn.Module, ABC):
    """Base class of the depth methods (see the module docstring).

    Class attributes:
        name: the method's registry name.
        modes: the decision rules it supports.
        causal_modes: modes that decide each token from its own past only (valid for
            left-to-right decoding and a KV cache).
    """

    name = "depth"
    modes: tuple[str, ...] = ()
    causal_modes: tuple[str, ...] = ()

    def __init__(self, *, train_mode: str, eval_mode: str, activation: str = "swiglu") -> None:
        super().__init__()
        for label, mode in (("train_mode", train_mode), ("eval_mode", eval_mode)):
            if mode not in self.modes:
                raise ConfigError(f"{self.name}: {label}={mode!r} is not one of {list(self.modes)}.")
        self.train_mode, self.eval_mode = train_mode, eval_mode
        self.activation = activation
        self._pinned: str | None = None

    @property
    def mode(self) -> str:
        if self._pinned is not None:
            return self._pinned
        return self.train_mode if self.training else self.eval_mode

    @contextmanager
    def use_mode(self, mode: str) -> Iterator[None]:
        """Run with decision rule ``mode`` inside the block (e.g. a baseline for comparison)."""
        if mode not in self.modes:
            raise ConfigError(f"{self.name}: mode {mode!r} is not one of {list(self.modes)}.")
        previous, self._pinned = self._pinned, mode
        try:
            yield
        finally:
            self._pinned = previous

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "train_mode": self.train_mode, "eval_mode": self.eval_mode}

    @abstractmethod
    def forward(
        self,
        blocks: nn.ModuleList,
        x_BSD: torch.Tensor,
        cos_Sd: torch.Tensor,
        sin_Sd: torch.Tensor,
        attn_mask_BSS: torch.Tensor | None,
        padding_mask_BS: torch.Tensor | None,
        context: RoutingContext,
    ) -> tuple[torch.Tensor, DepthResult]:
        ...
