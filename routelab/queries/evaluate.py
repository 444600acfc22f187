"""Replay evaluation: fit a router on the training split, route the test split, measure.

For every (dataset, router, seed): the router's operating points on the test split (the
utility rule swept over lambda, a cascade's thresholds, a bandit's online replay per
lambda), their cost-quality curve, AIQ and the gap to the oracle's AIQ; for two-model
datasets APGR and CPT(50%/80%) by RouteLLM's decile sweep; for bandits the regret against
the best fixed model. Fit and routing time are measured on the way (the embedder is fitted
once per dataset and seed and is not part of the routing time).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from routelab.queries.base import FitContext, OperatingPoint, QueryRouter, ScoreScale, create_query_router, utility_choice
from routelab.queries.dataset import QueryDataset
from routelab.queries.embedders import TfidfSvdEmbedder
from routelab.queries.metrics import SharePoint, aiq, apgr, cpt, strong_share_curve


@dataclass
class Prepared:
    """A dataset split, embedded, with the fit context every router of this seed shares."""

    dataset: QueryDataset
    train: QueryDataset
    test: QueryDataset
    X_train: np.ndarray
    X_test: np.ndarray
    scale: ScoreScale
    cost_M: np.ndarray
    seed: int
    embed_s: float
    c_max: float  # AIQ's cost window: the test cost of always calling the most expensive model
    embedder: Any = None  # fitted on the training prompts; embeds new prompts for RoutingPolicy
    oracle_aiq: float | None = None

    def context(self) -> FitContext:
        return FitContext(self.train, self.X_train, self.scale(self.train.score_QM), self.cost_M, self.scale, self.seed)


def prepare(dataset: QueryDataset, seed: int = 0, embedder_factory: Callable[[int], Any] | None = None) -> Prepared:
    """Split, fit the embedder on the training prompts only, embed both splits."""
    train, test = dataset.part("train"), dataset.part("test")
    embedder = (embedder_factory or (lambda s: TfidfSvdEmbedder(seed=s)))(seed)
    start = time.perf_counter()
    embedder.fit(train)
    X_train, X_test = embedder.transform(train), embedder.transform(test)
    embed_s = time.perf_counter() - start
    mean_cost = train.mean_costs()
    return Prepared(dataset, train, test, X_train, X_test, ScoreScale.fit(train.score_QM), mean_cost / mean_cost.max(),
                    seed, embed_s, float(test.mean_costs().max()), embedder)


def curve_of(points: list[OperatingPoint], test: QueryDataset) -> tuple[np.ndarray, np.ndarray]:
    """Mean dollars per query and mean quality (raw score units) of every operating point."""
    rows = np.arange(test.num_queries)
    cost = np.array([p.paid_Q.mean() for p in points])
    quality = np.array([test.score_QM[rows, p.choice_Q].mean() for p in points])
    return cost, quality


def share_points(router: QueryRouter, prepared: Prepared, points: list[OperatingPoint]) -> list[SharePoint] | None:
    """Two models: RouteLLM's decile sweep of the strong-win score, or (bandits) the lambda sweep
    with the all-weak and all-strong end points."""
    test = prepared.test
    strong, weak = prepared.train.strong_weak()
    scores = router.strong_scores(test, prepared.X_test, strong, weak)
    if scores is not None:
        if np.unique(scores).size < 2:
            return None  # a constant score has one operating point: no curve over the strong-call share
        return strong_share_curve(scores, test.score_QM[:, strong], test.score_QM[:, weak])
    rows = np.arange(test.num_queries)
    found = [SharePoint(p.param, float((p.choice_Q == strong).mean()), float(test.score_QM[rows, p.choice_Q].mean()))
             for p in points]
    ends = [SharePoint(float("inf"), 0.0, float(test.score_QM[:, weak].mean())),
            SharePoint(float("-inf"), 1.0, float(test.score_QM[:, strong].mean()))]
    return ends + found


def routing_time(router: QueryRouter, prepared: Prepared, points_time_s: float, points: list[OperatingPoint]) -> float:
    """Seconds to score and decide the whole test split once (one lambda / threshold)."""
    if router.kind == "score":
        start = time.perf_counter()
        score_hat = router.predict(prepared.test, prepared.X_test)
        utility_choice(score_hat, prepared.cost_M, 0.1)
        return time.perf_counter() - start
    if router.kind == "bandit":
        return float(np.mean([p.extra["test_replay_s"] for p in points]))
    return points_time_s / len(points)


def evaluate_router(prepared: Prepared, name: str, options: dict[str, Any] | None = None, label: str | None = None
                    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One router on one prepared dataset: (result row, curve rows)."""
    test, seed = prepared.test, prepared.seed
    router = create_query_router(name, seed=seed, **(options or {}))
    start = time.perf_counter()
    router.fit(prepared.context())
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    points = router.operating_points(test, prepared.X_test)
    points_s = time.perf_counter() - start
    route_s = routing_time(router, prepared, points_s, points)
    cost, quality = curve_of(points, test)
    best = int(np.argmax(quality))
    row: dict[str, Any] = {
        "dataset": prepared.dataset.name, "router": label or name, "preset": name, "seed": seed,
        "test_queries": test.num_queries, "models": test.num_models,
        "aiq": aiq(cost, quality, prepared.c_max), "best_quality": float(quality[best]),
        "cost_per_1k_at_best": float(cost[best] * 1000), "fit_s": fit_s, "route_s": route_s,
        "queries_per_s": test.num_queries / route_s if route_s > 0 else float("inf"),
    }
    row["oracle_gap"] = oracle_aiq(prepared) - row["aiq"]
    curve = [{"dataset": row["dataset"], "router": row["router"], "seed": seed, "param": p.param,
              "cost_per_1k": float(c * 1000), "quality": float(q)} for p, c, q in zip(points, cost, quality)]
    if test.num_models == 2:
        strong, weak = prepared.train.strong_weak()
        weak_q, strong_q = float(test.score_QM[:, weak].mean()), float(test.score_QM[:, strong].mean())
        shares = share_points(router, prepared, points)
        row.update({"strong_model": test.models[strong], "weak_model": test.models[weak]})
        if shares is not None:
            row.update({"apgr": apgr(shares, weak_q, strong_q), "cpt50": cpt(shares, weak_q, strong_q, 0.5),
                        "cpt80": cpt(shares, weak_q, strong_q, 0.8)})
        for point, c in zip(points, curve):
            c["strong_share"] = float((point.choice_Q == strong).mean())
    if router.kind == "bandit":
        by_lambda = {p.param: p.extra["regret"] / test.num_queries for p in points}
        row["regret_per_query"] = float(np.mean(list(by_lambda.values())))
        row["regret_per_query_lambda0"] = float(by_lambda.get(0.0, float("nan")))
    return row, curve


def oracle_aiq(prepared: Prepared) -> float:
    """AIQ of the oracle on this prepared split (computed once)."""
    if prepared.oracle_aiq is None:
        router = create_query_router("oracle", seed=prepared.seed).fit(prepared.context())
        cost, quality = curve_of(router.operating_points(prepared.test, prepared.X_test), prepared.test)
        prepared.oracle_aiq = aiq(cost, quality, prepared.c_max)
    return prepared.oracle_aiq
