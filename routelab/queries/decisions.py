"""Decision rules: scores -> one model per query.

* ``utility_choice`` (in ``routelab.queries.base``): argmax score_hat - lambda * cost.
* ``calibrate_share``: the threshold on P(strong wins) that sends a target share of queries to
  the strong model on a held-out sample (RouteLLM ``calibrate_threshold``: the (1 - share)
  quantile of the scores), reported with the share it achieves.
* ``calibrate_budget``: the threshold that keeps the spend per 1,000 queries within a budget
  on the held-out sample (greedy by score: the highest-scoring queries go strong first).
* ``calibrate_lambda``: N models: the smallest lambda whose utility choices stay within a budget.
* ``RoutingPolicy.route``: one prompt -> a ``Decision`` with a model and a reason, always;
  when the router cannot decide (empty prompt, non-finite scores) it returns the fallback
  model and says why (never None).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from routelab.core.errors import ConfigError, InputError
from routelab.queries.base import QueryRouter, utility_choice
from routelab.queries.dataset import QueryDataset


@dataclass(frozen=True)
class Calibration:
    """A threshold on a router's strong-win score and what it achieved where it was calibrated."""

    threshold: float
    target: float
    achieved: float
    kind: str  # "share" (of strong calls) or "budget" (US dollars per 1,000 queries)

    def strong(self, strong_score_Q: np.ndarray) -> np.ndarray:
        """True where the query goes to the strong model (score >= threshold)."""
        return np.asarray(strong_score_Q) >= self.threshold


def _check_scores(scores: np.ndarray, where: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0 or not np.isfinite(scores).all():
        raise InputError(f"{where} must be a non-empty 1-D array of finite scores.")
    return scores


def calibrate_share(strong_score_Q: np.ndarray, target_share: float) -> Calibration:
    """Threshold = the (1 - target) quantile of held-out scores (RouteLLM's calibration)."""
    if not 0.0 <= target_share <= 1.0:
        raise ConfigError(f"target_share must be in [0, 1], got {target_share}.")
    scores = _check_scores(strong_score_Q, "strong_score_Q")
    if target_share == 0.0:
        threshold = float(np.nextafter(scores.max(), np.inf))
    else:
        threshold = float(np.quantile(scores, 1.0 - target_share))
    return Calibration(threshold, target_share, float((scores >= threshold).mean()), "share")


def calibrate_budget(strong_score_Q: np.ndarray, strong_cost_Q: np.ndarray, weak_cost_Q: np.ndarray,
                     budget_per_1k: float) -> Calibration:
    """Lowest threshold whose held-out spend per 1,000 queries stays <= ``budget_per_1k`` dollars."""
    scores = _check_scores(strong_score_Q, "strong_score_Q")
    strong_cost = np.asarray(strong_cost_Q, dtype=np.float64)
    weak_cost = np.asarray(weak_cost_Q, dtype=np.float64)
    if strong_cost.shape != scores.shape or weak_cost.shape != scores.shape:
        raise InputError("strong_cost_Q and weak_cost_Q must have one cost per query, like strong_score_Q.")
    n = len(scores)
    base = weak_cost.sum()
    if base / n * 1000 > budget_per_1k:
        raise ConfigError(f"budget ${budget_per_1k}/1k queries is below the cost of always calling the weak model "
                          f"(${base / n * 1000:.4g}/1k).")
    order = np.argsort(-scores, kind="stable")
    spend = (base + np.concatenate([[0.0], np.cumsum(strong_cost[order] - weak_cost[order])])) / n * 1000
    # k strong calls are only possible at a threshold that also admits every tie of the k-th score
    feasible = [k for k in range(n + 1) if spend[k] <= budget_per_1k + 1e-12
                and (k == 0 or k == n or scores[order[k - 1]] > scores[order[k]])]
    k = max(feasible)
    threshold = float(np.nextafter(scores.max(), np.inf)) if k == 0 else float(scores[order[k - 1]])
    strong = scores >= threshold
    achieved = float((np.where(strong, strong_cost, weak_cost)).mean() * 1000)
    return Calibration(threshold, budget_per_1k, achieved, "budget")


def calibrate_lambda(score_hat_QM: np.ndarray, cost_QM: np.ndarray, cost_M: np.ndarray, budget_per_1k: float,
                     iterations: int = 60) -> tuple[float, float]:
    """N models: the smallest lambda (bisection) whose utility choices spend <= the budget; returns
    (lambda, achieved dollars per 1,000 queries) on the held-out sample."""
    rows = np.arange(len(score_hat_QM))

    def spend(lam: float) -> float:
        return float(cost_QM[rows, utility_choice(score_hat_QM, cost_M, lam)].mean() * 1000)

    low, high = 0.0, 1.0
    if spend(low) <= budget_per_1k:
        return 0.0, spend(0.0)
    while spend(high) > budget_per_1k:
        high *= 2.0
        if high > 1e9:
            raise ConfigError(f"budget ${budget_per_1k}/1k queries is below the cheapest possible spend.")
    for _ in range(iterations):
        mid = (low + high) / 2
        low, high = (low, mid) if spend(mid) <= budget_per_1k else (mid, high)
    return high, spend(high)


@dataclass(frozen=True)
class Decision:
    """The model for one query and why it was chosen."""

    model: str
    reason: str
    scores: dict[str, float] | None = None


class RoutingPolicy:
    """A fitted router + its embedder + a rule, for routing new prompts one at a time or in batches.

    ``rule``: ``("utility", lam)`` or, for two models, ``("threshold", Calibration)``.
    """

    def __init__(self, router: QueryRouter, embedder, models: list[str], rule: tuple[str, object],
                 fallback: str) -> None:
        if fallback not in models:
            raise ConfigError(f"fallback model {fallback!r} is not one of {models}.")
        if rule[0] not in ("utility", "threshold"):
            raise ConfigError(f"rule {rule[0]!r} must be 'utility' or 'threshold'.")
        if router.context is None:
            raise ConfigError("RoutingPolicy needs a fitted router (call router.fit first).")
        self.router, self.embedder, self.models, self.rule, self.fallback = router, embedder, models, rule, fallback

    def route(self, prompts: list[str]) -> list[Decision]:
        prompts = list(prompts)
        empty = [not (isinstance(p, str) and p.strip()) for p in prompts]
        decisions: list[Decision | None] = [None] * len(prompts)
        for i, is_empty in enumerate(empty):
            if is_empty:
                decisions[i] = Decision(self.fallback, "fallback: empty prompt, nothing to score")
        live = [i for i, is_empty in enumerate(empty) if not is_empty]
        if live:
            batch = prompt_batch([prompts[i] for i in live], self.models)
            X = self.embedder.transform(batch)
            score_hat = self.router.predict(batch, X)
            strong, weak = (self.router.context.train.strong_weak() if self.rule[0] == "threshold" else (None, None))
            for row, i in enumerate(live):
                scores = score_hat[row]
                named = {m: float(s) for m, s in zip(self.models, scores)}
                if not np.isfinite(scores).all():
                    decisions[i] = Decision(self.fallback, "fallback: the router returned non-finite scores", named)
                elif self.rule[0] == "utility":
                    lam = float(self.rule[1])
                    choice = int(utility_choice(scores[None, :], self.router.context.cost_M, lam)[0])
                    decisions[i] = Decision(self.models[choice], f"utility: argmax score - {lam:g} x cost", named)
                else:
                    calibration: Calibration = self.rule[1]
                    s = self.router.strong_scores(batch.subset([row]), X[row:row + 1], strong, weak)[0]
                    go_strong = s >= calibration.threshold
                    decisions[i] = Decision(self.models[strong if go_strong else weak],
                                            f"threshold: strong score {s:.4g} {'>=' if go_strong else '<'} "
                                            f"{calibration.threshold:.4g}", named)
        return decisions  # type: ignore[return-value]


def prompt_batch(prompts: list[str], models: list[str]) -> QueryDataset:
    """A dataset of unseen prompts (no outcomes) for routing."""
    Q, M = len(prompts), len(models)
    nan = np.full((Q, M), np.nan)
    return QueryDataset(
        name="prompts", models=list(models), query_ids=np.array([f"prompt/{i}" for i in range(Q)]), prompts=prompts,
        tasks=np.array(["all"] * Q, dtype=object), split=np.array(["test"] * Q, dtype=object), score_QM=nan.copy(),
        cost_QM=nan.copy(), in_tokens_QM=nan.copy(), out_tokens_QM=nan.copy(), contaminated=np.zeros(Q, dtype=bool),
    )
