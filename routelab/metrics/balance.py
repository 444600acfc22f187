"""Load-balance metrics of a routing, per layer, with percentiles across layers.

Definitions: for per-expert loads ``c_e``,
MaxVio = (max c - mean c) / mean c (Wang et al., "Auxiliary-loss-free load balancing",
arXiv 2408.15664); CV = population std / mean; normalised entropy H(c / sum c) / ln E;
min/max ratio; Gini coefficient; dead experts = experts with no load. MaxVio, CV, entropy
and dead experts come from ``routelab.core.routing_stats.balance_stats``, the same code that fills
``Routing.stats`` during training.

Balance measured per batch and over the whole evaluation set differ (a router can balance
every batch without balancing the set, or the other way round; the global- vs local-balance
point of moe-lrc, arXiv 2505.16056), so both are provided.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from routelab.core.errors import ConfigError
from routelab.core.routing_stats import balance_stats

METRICS = ("max_vio", "cv", "entropy", "gini", "min_max_ratio", "dead_experts")


def load_counts(topk_idx_TK: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 ``[E]`` assignments per expert; ``-1`` slots are ignored."""
    flat = np.asarray(topk_idx_TK).reshape(-1)
    return np.bincount(flat[flat >= 0], minlength=num_experts)[:num_experts].astype(np.int64)


def gini(load_E: np.ndarray) -> float:
    """Gini coefficient ``sum_ij |c_i - c_j| / (2 E^2 mean c)`` (0 = equal, 1 - 1/E = one expert)."""
    load = np.sort(np.asarray(load_E, dtype=np.float64))
    n, total = len(load), load.sum()
    if n == 0 or total <= 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float((2 * ranks - n - 1) @ load / (n * total))


def balance_metrics(load_E: np.ndarray) -> dict[str, float]:
    """MaxVio, CV, normalised entropy, Gini, min/max ratio and dead experts of one load vector.

    Example: ``[4, 2, 1, 1]`` gives MaxVio 1.0, CV 0.6124, entropy 0.875 (hand-computed; tests/metrics/test_metrics.py).
    With zero total load every value is 0.
    """
    load = np.asarray(load_E, dtype=np.float64)
    core = {k: float(v) for k, v in balance_stats(torch.from_numpy(load.astype(np.float32))).items()}
    total_max = load.max(initial=0.0)
    return {
        "max_vio": core["max_vio"],
        "cv": core["cv"],
        "entropy": core["entropy"],
        "gini": gini(load),
        "min_max_ratio": float(load.min() / total_max) if total_max > 0 else 0.0,
        "dead_experts": core["dead_experts"],
    }


@dataclass(frozen=True)
class BalanceReport:
    """Balance of every layer of a trace.

    Attributes:
        layers: layer indices, in order.
        loads: int64 ``[L, E]`` assignments per layer and expert over the whole trace.
        per_layer: metric name -> ``[L]`` values over the whole trace (global balance).
        per_batch: metric name -> ``[L]`` means over batches of ``batch_tokens`` tokens
            (local balance), or None when no batch size was given.
    """

    layers: tuple[int, ...]
    loads: np.ndarray
    per_layer: dict[str, np.ndarray]
    per_batch: dict[str, np.ndarray] | None

    def percentiles(
        self, qs: Sequence[float] = (0, 50, 90, 100), *, local: bool = False
    ) -> dict[str, dict[str, float]]:
        """``{metric: {"p50": ..., ...}}`` across layers (``local``: of the per-batch means)."""
        source = self.per_batch if local else self.per_layer
        if source is None:
            raise ConfigError("per-batch balance was not computed; pass batch_tokens to layer_balance().")
        return {m: {f"p{q:g}": float(np.percentile(v, q)) for q in qs} for m, v in source.items()}


def layer_balance(trace, *, batch_tokens: int | None = None) -> BalanceReport:  # noqa: ANN001 - any TraceLike
    """Balance metrics of every layer of ``trace`` (a ``Trace`` or ``InMemoryTrace``).

    Args:
        batch_tokens: also compute the metrics on consecutive batches of this many tokens
            and average them per layer (the local balance a training batch sees).
    """
    if batch_tokens is not None and (isinstance(batch_tokens, bool) or int(batch_tokens) < 1):
        raise ConfigError(f"batch_tokens must be a positive integer, got {batch_tokens!r}.")
    layers = tuple(trace.layers)
    loads = np.zeros((len(layers), trace.num_experts), np.int64)
    per_layer = {m: np.zeros(len(layers)) for m in METRICS}
    per_batch = {m: np.zeros(len(layers)) for m in METRICS} if batch_tokens else None
    for i, layer in enumerate(layers):
        idx = trace.topk_idx(layer)
        loads[i] = load_counts(idx, trace.num_experts)
        for m, v in balance_metrics(loads[i]).items():
            per_layer[m][i] = v
        if per_batch is not None:
            batch_values = [balance_metrics(load_counts(idx[s : s + batch_tokens], trace.num_experts))
                            for s in range(0, len(idx), int(batch_tokens))]
            for m in METRICS:
                per_batch[m][i] = float(np.mean([b[m] for b in batch_values])) if batch_values else 0.0
    return BalanceReport(layers, loads, per_layer, per_batch)
