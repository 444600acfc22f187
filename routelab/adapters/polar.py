"""POLAR: cache-aware contextual-bandit routing of requests to adapters with a resident cache.

POLAR (arXiv 2604.16583; no public code: the router below is standard disjoint LinUCB,
Li et al. 2010, arXiv 1003.0146, with the paper's cache-aware penalty). ``N`` adapters, of
which ``K`` are resident in device memory; request ``t`` has a context ``x_t``.

- Fast timescale (routing): per arm ``A_a = lam I + sum x x^T``, ``b_a = sum r x``,
  ``theta_a = A_a^-1 b_a``; ``score_a = theta_a^T x + alpha sqrt(x^T A_a^-1 x) - c [a not resident]``;
  route to the argmax (ties to the lowest id), observe the reward, update that arm only.
  A non-resident choice pays one paging load (``c`` is its cost in reward units).
- Slow timescale (cache): epochs of ``epoch_length`` requests (doubling lengths for
  POLAR+); at each boundary the ``K`` arms of highest mean optimistic value
  ``theta_a^T x + alpha sqrt(x^T A_a^-1 x)`` over the epoch's contexts become resident.
  POLAR+ also forces an exploration pull of a non-resident arm every ``explore_every``
  requests.

``lru_paging_loads`` replays the chosen-adapter stream through the expert-cache simulator
of ``routelab.systems`` (the same stack replay) to compare with a plain LRU cache of ``K``.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import numpy as np
import torch

from routelab.core import ConfigError, InputError
from routelab.core.validation import check_non_negative, check_positive_int


TIE_TOL = 1e-12


class PolarRouter:
    """See the module docstring. ``select(x)`` returns the arm; ``update(arm, x, reward)`` learns."""

    def __init__(self, num_adapters: int, context_dim: int, cache_size: int, *, alpha: float = 1.0,
                 paging_cost: float = 0.0, lam: float = 1.0, epoch_length: int = 100, doubling: bool = False,
                 explore_every: int = 0) -> None:
        self.num_adapters = check_positive_int("num_adapters", num_adapters)
        self.context_dim = check_positive_int("context_dim", context_dim)
        self.cache_size = check_positive_int("cache_size", cache_size)
        if cache_size > num_adapters:
            raise ConfigError(f"cache_size={cache_size} must be <= num_adapters={num_adapters}.")
        self.alpha = check_non_negative("alpha", alpha)
        self.paging_cost = check_non_negative("paging_cost", paging_cost)
        if lam <= 0:
            raise ConfigError(f"lam must be > 0 (ridge regularisation), got {lam}.")
        self.epoch_length = check_positive_int("epoch_length", epoch_length)
        self.doubling = bool(doubling)
        self.explore_every = check_positive_int("explore_every", explore_every, minimum=0)
        self.A = np.stack([lam * np.eye(context_dim) for _ in range(num_adapters)])
        self.b = np.zeros((num_adapters, context_dim))
        self.resident = np.zeros(num_adapters, dtype=bool)
        self.resident[:cache_size] = True
        self.pulls = np.zeros(num_adapters, dtype=np.int64)
        self.step = 0
        self.epoch_contexts: list[np.ndarray] = []
        self.current_epoch_length = epoch_length
        self.epoch_start = 0
        self.paging_loads = 0

    def optimistic(self, x: np.ndarray) -> np.ndarray:
        """``[N]`` ``theta_a^T x + alpha sqrt(x^T A_a^-1 x)`` (no cache penalty)."""
        a_inv = np.linalg.inv(self.A)
        theta = np.einsum("nij,nj->ni", a_inv, self.b)
        bonus = np.sqrt(np.maximum(np.einsum("i,nij,j->n", x, a_inv, x), 0.0))
        return theta @ x + self.alpha * bonus

    def scores(self, x: np.ndarray) -> np.ndarray:
        return self.optimistic(x) - self.paging_cost * (~self.resident)

    def select(self, x: np.ndarray | torch.Tensor) -> int:
        x = self._context(x)
        self.step += 1
        if self.explore_every and self.step % self.explore_every == 0 and (~self.resident).any():
            candidates = np.flatnonzero(~self.resident)
            arm = int(candidates[np.argmin(self.pulls[candidates])])
        else:
            scores = self.scores(x)
            arm = int(np.flatnonzero(scores >= scores.max() - TIE_TOL)[0])  # ties (to rounding) -> lowest id
        if not self.resident[arm]:
            self.paging_loads += 1
        self.epoch_contexts.append(x)
        return arm

    def update(self, arm: int, x: np.ndarray | torch.Tensor, reward: float) -> None:
        x = self._context(x)
        self.A[arm] += np.outer(x, x)
        self.b[arm] += reward * x
        self.pulls[arm] += 1
        if self.step - self.epoch_start >= self.current_epoch_length:
            self.refresh_cache()

    def refresh_cache(self) -> None:
        """Epoch boundary: the ``K`` arms with the highest mean optimistic value become resident."""
        if self.epoch_contexts:
            value = np.mean([self.optimistic(x) for x in self.epoch_contexts], axis=0)
            order = np.argsort(-value, kind="stable")
            self.resident[:] = False
            self.resident[order[: self.cache_size]] = True
        self.epoch_contexts = []
        self.epoch_start = self.step
        if self.doubling:
            self.current_epoch_length *= 2

    def _context(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
        if x.shape != (self.context_dim,) or not np.isfinite(x).all():
            raise InputError(f"context must be a finite vector of shape ({self.context_dim},), got {x.shape}.")
        return x.astype(np.float64)


@dataclass
class PolarRun:
    """What ``run_polar`` returns: the chosen arms, rewards and paging loads of each request."""

    choices: np.ndarray
    rewards: np.ndarray
    paging_loads: int


def run_polar(router: PolarRouter, contexts_TD: np.ndarray, reward: Callable[[int, int], float]) -> PolarRun:
    """Route every context in order; ``reward(t, arm)`` is observed after each choice."""
    choices, rewards = [], []
    for t, x in enumerate(np.asarray(contexts_TD, dtype=np.float64)):
        arm = router.select(x)
        r = float(reward(t, arm))
        router.update(arm, x, r)
        choices.append(arm)
        rewards.append(r)
    return PolarRun(np.asarray(choices, dtype=np.int64), np.asarray(rewards), router.paging_loads)


def lru_paging_loads(choices_T: np.ndarray, num_adapters: int, cache_size: int) -> int:
    """Loads of an LRU cache of ``cache_size`` adapters serving ``choices_T`` (systems' stack replay)."""
    from routelab.metrics.replay import access_trace, stack_replay

    ids = np.asarray(choices_T, dtype=np.int64).reshape(-1, 1)
    replay = stack_replay(access_trace(ids, num_adapters), num_adapters, "lru")
    return int(replay.loads().sum(axis=0)[cache_size - 1])
