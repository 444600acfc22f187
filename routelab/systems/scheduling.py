"""Token and sequence scheduling across batches (ExpertFlow, arXiv 2410.17954).

ExpertFlow regroups queued work so that the items sharing a batch have similar routes,
which cuts the experts each batch activates (and so the experts an offloading server must
hold or load). The objective over a partition of the items into batches of ``B`` is

    cost = Σ_batches Σ_layers |∪_{item ∈ batch} S_{item, layer}|,

with ``S`` the item's expert set at each layer (a token's top-k set, or the union over a
sequence's tokens). Autoregressive decoding can only move whole sequences between decode
batches, so ``unit="sequence"`` is the serving case; ``unit="token"`` is prefill-style.

Greedy scheduler [reconstruction]: within each pool of queued items, seed a batch
with the item farthest (mean Jaccard distance) from the others left, then repeatedly add
the item that grows the batch's union the least. A pool keeps its arrival order when that
is already cheaper, so scheduling never costs more than not scheduling.
Oracle: routes {0},{0},{1},{1} in the order {0},{1},{0},{1} with B = 2: cost 4 -> 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from routelab.core.errors import ConfigError, InputError
from routelab.core.validation import check_choice


def route_sets(trace, unit: str = "sequence") -> np.ndarray:  # noqa: ANN001 - TraceLike
    """bool ``[Y, X]`` (``X = L·E``): each item's experts at every layer (layer-major bitmap).

    ``unit``: ``token`` (one row per token) or ``sequence`` (union over the sequence's tokens).
    """
    check_choice("unit", unit, ("token", "sequence"))
    num_experts = trace.num_experts
    blocks = []
    offsets = trace.sequence_offsets() if unit == "sequence" else None
    for layer in trace.layers:
        idx = trace.topk_idx(layer)
        mask = np.zeros((idx.shape[0], num_experts + 1), dtype=bool)
        mask[np.repeat(np.arange(idx.shape[0]), idx.shape[1]), np.where(idx >= 0, idx, num_experts).ravel()] = True
        mask = mask[:, :num_experts]
        if offsets is not None:
            mask = np.logical_or.reduceat(mask, offsets[:-1], axis=0) if len(offsets) > 1 else mask[:0]
        blocks.append(mask)
    return np.concatenate(blocks, axis=1)


def batch_cost(sets_YX: np.ndarray, batches: list[np.ndarray]) -> int:
    """``Σ_b |∪ sets|`` over all layers (the bitmap concatenates layers)."""
    return int(sum(np.logical_or.reduce(sets_YX[b], axis=0).sum() for b in batches if len(b)))


@dataclass(frozen=True)
class ScheduleResult:
    """A schedule and its cost against arrival order.

    Attributes:
        batches: item indices of each batch, in execution order.
        cost: ``Σ_batches Σ_layers`` distinct experts of the schedule.
        arrival_cost: the same for consecutive batches in arrival order.
        num_layers: layers in the bitmaps (to report per batch-layer means).
    """

    batches: list[np.ndarray]
    cost: int
    arrival_cost: int
    num_layers: int

    @property
    def reduction(self) -> float:
        """Relative cut of distinct expert activations (0 = none)."""
        return 1.0 - self.cost / self.arrival_cost if self.arrival_cost else 0.0

    @property
    def experts_per_batch_layer(self) -> float:
        return self.cost / max(len(self.batches) * self.num_layers, 1)

    @property
    def arrival_experts_per_batch_layer(self) -> float:
        return self.arrival_cost / max(len(self.batches) * self.num_layers, 1)


def _greedy_pool(sets: np.ndarray, batch_size: int) -> list[np.ndarray]:
    n = len(sets)
    as_float = sets.astype(np.float32)
    inter = as_float @ as_float.T
    size = as_float.sum(axis=1)
    union = size[:, None] + size[None, :] - inter
    dist = np.where(union > 0, 1.0 - inter / np.maximum(union, 1), 0.0)
    remaining = np.ones(n, dtype=bool)
    batches = []
    while remaining.any():
        left = np.flatnonzero(remaining)
        if len(left) > 1:
            sub = dist[np.ix_(left, left)]
            seed = int(left[np.argmax(sub.sum(axis=1) / (len(left) - 1))])
        else:
            seed = int(left[0])
        batch = [seed]
        remaining[seed] = False
        covered = sets[seed].copy()
        while len(batch) < batch_size and remaining.any():
            left = np.flatnonzero(remaining)
            growth = (sets[left] & ~covered).sum(axis=1)
            pick = int(left[np.argmin(growth)])
            batch.append(pick)
            remaining[pick] = False
            covered |= sets[pick]
        batches.append(np.array(batch))
    return batches


def schedule_batches(sets_YX: np.ndarray, batch_size: int, *, pool_size: int | None = None,
                     num_layers: int = 1) -> ScheduleResult:
    """Greedily regroup the items of ``sets_YX`` into batches of ``batch_size``.

    Args:
        sets_YX: bool ``[Y, X]`` route bitmaps (``route_sets``).
        pool_size: items the scheduler may reorder at once (a serving queue), a multiple of
            ``batch_size``; default: all items.
        num_layers: layers in the bitmaps (only for the per batch-layer means).
    """
    sets = np.asarray(sets_YX, dtype=bool)
    if sets.ndim != 2:
        raise InputError(f"sets_YX must be a [items, layers*experts] bitmap, got shape {sets.shape}.")
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
    batch_size = int(batch_size)
    pool = max(len(sets), 1) if pool_size is None else int(pool_size)
    if pool_size is not None and (pool < batch_size or pool % batch_size):
        raise ConfigError(f"pool_size must be a positive multiple of batch_size={batch_size}, got {pool_size}.")
    batches: list[np.ndarray] = []
    arrival: list[np.ndarray] = []
    for start in range(0, len(sets), max(pool, 1)):
        ids = np.arange(start, min(start + pool, len(sets)))
        in_order = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
        greedy = [ids[b] for b in _greedy_pool(sets[ids], batch_size)]
        arrival += in_order
        batches += greedy if batch_cost(sets, greedy) < batch_cost(sets, in_order) else in_order
    return ScheduleResult(batches, batch_cost(sets, batches), batch_cost(sets, arrival), num_layers)


def schedule_trace(
    trace,  # noqa: ANN001 - TraceLike
    batch_size: int,
    *,
    unit: str = "sequence",
    pool_size: int | None = None,
) -> ScheduleResult:
    """``schedule_batches`` on the route sets of ``trace``."""
    return schedule_batches(route_sets(trace, unit), batch_size, pool_size=pool_size, num_layers=len(trace.layers))
