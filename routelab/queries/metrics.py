"""Metrics of query routing: cost-quality curve and hull, AIQ, APGR, CPT, oracle gap, regret.

* **AIQ** (RouterBench, Hu et al., arXiv 2403.12031, ``evaluation/AIQ.py``): the router's
  (cost, quality) points, their upper convex hull made non-decreasing (mixing two operating
  points at random achieves every point between them), extended flat to ``c_max``; AIQ =
  area under it from the cheapest point to ``c_max``, divided by ``c_max``. routelab fixes
  ``c_max`` to the cost of always calling the most expensive model, so a router's AIQ does
  not depend on which other routers are compared (RouterBench takes the largest cost among
  the routers compared); a point dearer than ``c_max`` lies outside the window.
* **APGR / CPT** (RouteLLM, Ong et al., arXiv 2406.18665, ``routellm/evals/evaluate.py``):
  thresholds at the deciles of the router's strong-win scores (``pd.qcut(scores, 10)``
  edges; a query goes to the strong model when its score is >= the threshold, > at the last
  edge); quality against the percentage of strong calls; APGR = (AUC - weak AUC) / (strong
  AUC - weak AUC) by the trapezoid rule over the strong-call share; CPT(x%) =
  ``np.interp(weak + x (strong - weak), quality, strong %)`` exactly as RouteLLM computes it
  (on a curve that is not increasing ``np.interp`` is ill-defined; ``cpt(method="first")``
  gives the first crossing instead). One deliberate difference: equal decile edges (a router
  with tied scores) are dropped, where ``pd.qcut`` would raise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from routelab.core.errors import InputError


@dataclass(frozen=True)
class SharePoint:
    """One threshold of a two-model router: share of strong calls (0-1) and the mean quality."""

    threshold: float
    strong_share: float
    quality: float


def trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid-rule integral of ``y`` over ``x`` (``np.trapz``; written out for every numpy version)."""
    y, x = np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def decile_thresholds(strong_score_Q: np.ndarray, num_results: int = 10) -> np.ndarray:
    """The ``pd.qcut(scores, num_results, retbins=True)`` bin edges (linear quantiles), duplicates dropped."""
    scores = np.asarray(strong_score_Q, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0 or not np.isfinite(scores).all():
        raise InputError("strong_score_Q must be a non-empty 1-D array of finite scores.")
    edges = np.quantile(scores, np.linspace(0.0, 1.0, num_results + 1))
    return np.unique(edges)


def strong_share_curve(
    strong_score_Q: np.ndarray, strong_quality_Q: np.ndarray, weak_quality_Q: np.ndarray, num_results: int = 10
) -> list[SharePoint]:
    """RouteLLM's evaluation sweep: one point per decile edge, sorted by strong-call share."""
    scores = np.asarray(strong_score_Q, dtype=np.float64)
    thresholds = decile_thresholds(scores, num_results)
    points = []
    for i, threshold in enumerate(thresholds):
        strong = scores >= threshold if i != len(thresholds) - 1 else scores > threshold
        quality = np.where(strong, strong_quality_Q, weak_quality_Q).mean()
        points.append(SharePoint(float(threshold), float(strong.mean()), float(quality)))
    return sorted(points, key=lambda p: p.strong_share)


def _sorted_xy(points: list[SharePoint]) -> tuple[np.ndarray, np.ndarray]:
    if len(points) < 2:
        raise InputError("APGR/CPT need at least 2 operating points (strong-call shares).")
    ordered = sorted(points, key=lambda p: p.strong_share)
    return np.array([p.strong_share for p in ordered]), np.array([p.quality for p in ordered])


def apgr(points: list[SharePoint], weak_quality: float, strong_quality: float) -> float:
    """Average performance gap recovered (RouteLLM): trapezoid AUC over the strong-call share, normalised."""
    if strong_quality == weak_quality:
        raise InputError("APGR is undefined when the strong and weak models score the same.")
    share, quality = _sorted_xy(points)
    auc = trapezoid(quality, share)
    span = share[-1] - share[0]
    if span <= 0:
        raise InputError("APGR needs operating points at different strong-call shares.")
    return float((auc - weak_quality * span) / ((strong_quality - weak_quality) * span))


def cpt(points: list[SharePoint], weak_quality: float, strong_quality: float, recovered: float,
        method: str = "routellm") -> float:
    """Share of strong calls (0-1) needed to recover ``recovered`` (e.g. 0.5) of the weak->strong gap.

    ``method="routellm"``: ``np.interp(target, quality, share)`` on points sorted by share,
    RouteLLM's formula. ``method="first"``: the first share at which the piecewise-linear
    curve reaches the target (NaN if it never does).
    """
    share, quality = _sorted_xy(points)
    target = weak_quality + recovered * (strong_quality - weak_quality)
    if method == "routellm":
        return float(np.interp(target, quality, share))
    if method != "first":
        raise InputError(f"method={method!r} must be 'routellm' or 'first'.")
    if quality[0] >= target:
        return float(share[0])
    for i in range(1, len(share)):
        if quality[i] >= target:
            q0, q1 = quality[i - 1], quality[i]
            return float(share[i - 1] + (target - q0) / (q1 - q0) * (share[i] - share[i - 1]))
    return float("nan")


def oracle_share_quality(score_QM: np.ndarray, strong: int, weak: int, share: float) -> float:
    """Best mean quality with at most ``floor(share * Q)`` strong calls (RouteLLM's optimal router)."""
    gain = np.sort(score_QM[:, strong] - score_QM[:, weak])[::-1]
    calls = int(share * len(gain))
    return float(score_QM[:, weak].mean() + gain[:calls][gain[:calls] > 0].sum() / len(gain))


def upper_hull(cost: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Non-decreasing upper convex hull of (cost, quality) points, as ``[[cost, quality], ...]`` by cost."""
    points = np.column_stack([np.asarray(cost, dtype=np.float64), np.asarray(quality, dtype=np.float64)])
    if points.size == 0 or not np.isfinite(points).all():
        raise InputError("the cost-quality curve needs at least one finite point.")
    order = np.lexsort((-points[:, 1], points[:, 0]))
    hull: list[np.ndarray] = []
    for p in points[order]:
        if hull and p[0] == hull[-1][0]:
            continue  # same cost, lower quality (sorted by quality descending within a cost)
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:  # hull[-1] on or below the chord
                hull.pop()
            else:
                break
        hull.append(p)
    out = np.array(hull)
    best = int(np.argmax(out[:, 1]))
    return out[: best + 1]


def aiq(cost: np.ndarray, quality: np.ndarray, c_max: float) -> float:
    """Area under the non-decreasing hull from the cheapest point to ``c_max``, divided by ``c_max``."""
    if not (np.isfinite(c_max) and c_max > 0):
        raise InputError(f"c_max must be a positive cost, got {c_max!r}.")
    hull = upper_hull(cost, quality)
    if hull[0, 0] >= c_max:
        return 0.0
    xs = np.append(hull[:, 0], c_max)
    ys = np.append(hull[:, 1], hull[-1, 1])
    inside = xs < c_max
    x = np.append(xs[inside], c_max)
    y = np.append(ys[inside], np.interp(c_max, xs, ys))
    return float(trapezoid(y, x) / c_max)


def hull_quality_at(cost: np.ndarray, quality: np.ndarray, at_cost: np.ndarray) -> np.ndarray:
    """The hull's quality at the given costs (flat beyond its ends; NaN below its cheapest point)."""
    hull = upper_hull(cost, quality)
    at = np.asarray(at_cost, dtype=np.float64)
    values = np.interp(at, hull[:, 0], hull[:, 1])
    return np.where(at < hull[0, 0], np.nan, values)


def bandit_regret(reward_QM: np.ndarray, chosen_Q: np.ndarray) -> tuple[float, int]:
    """Cumulative regret against the best fixed model in hindsight, and that model's index."""
    totals = reward_QM.sum(axis=0)
    best = int(np.argmax(totals))
    earned = reward_QM[np.arange(len(chosen_Q)), chosen_Q].sum()
    return float(totals[best] - earned), best
