"""Online budget pacing for a two-model threshold router, the query-level analogue of
auxiliary-loss-free load balancing (Wang et al., arXiv 2408.15664; DeepSeek-V3).

Loss-free balancing keeps a bias per expert and, after each step, moves it by a fixed amount
``u`` against the sign of that expert's load error, so selection (not the gate values)
follows a capacity target. Here the "capacity" is a spending budget in dollars per 1,000
queries and the bias is the threshold on the router's strong-win score: after each query the
threshold moves up by ``step`` while the running spend is above budget and down while it is
below. The scores themselves are untouched, as the gate values are in loss-free balancing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from routelab.core.errors import ConfigError, InputError


@dataclass
class PacedRun:
    """What a paced (or fixed) threshold did on a stream of queries."""

    strong_Q: np.ndarray  # True where the strong model was called, in stream order
    threshold_Q: np.ndarray  # the threshold in force for each query
    spend_per_1k: float  # dollars per 1,000 queries over the whole stream


def paced_threshold(strong_score_Q: np.ndarray, strong_cost_Q: np.ndarray, weak_cost_Q: np.ndarray,
                    budget_per_1k: float, start_threshold: float, step: float = 0.01) -> PacedRun:
    """Route a stream (in the given order) with a threshold paced toward ``budget_per_1k``.

    ``step = 0`` is the fixed threshold. The cost of each call is known once it is made (its
    recorded ``strong_cost_Q``/``weak_cost_Q``), as a serving system knows a call's bill."""
    scores = np.asarray(strong_score_Q, dtype=np.float64)
    strong_cost = np.asarray(strong_cost_Q, dtype=np.float64)
    weak_cost = np.asarray(weak_cost_Q, dtype=np.float64)
    if scores.ndim != 1 or strong_cost.shape != scores.shape or weak_cost.shape != scores.shape:
        raise InputError("strong_score_Q, strong_cost_Q and weak_cost_Q must be 1-D arrays of equal length.")
    if not np.isfinite(scores).all():
        raise InputError("strong_score_Q holds NaN or Inf.")
    if budget_per_1k <= 0 or step < 0:
        raise ConfigError(f"budget_per_1k must be > 0 and step >= 0, got {budget_per_1k}, {step}.")
    target = budget_per_1k / 1000.0
    threshold = float(start_threshold)
    spent = 0.0
    strong = np.zeros(len(scores), dtype=bool)
    thresholds = np.empty(len(scores))
    for t in range(len(scores)):
        thresholds[t] = threshold
        strong[t] = scores[t] >= threshold
        spent += strong_cost[t] if strong[t] else weak_cost[t]
        threshold += step if spent / (t + 1) > target else -step
    return PacedRun(strong, thresholds, float(spent / max(len(scores), 1) * 1000))
