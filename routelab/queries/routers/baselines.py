"""Reference routers every comparison shows: random, cheapest, best single model, oracle."""

from __future__ import annotations

import numpy as np

from routelab.queries.base import QueryRouter, register
from routelab.queries.dataset import QueryDataset


@register
class RandomRouter(QueryRouter):
    """Uniform random scores (RouteLLM's ``random`` router): its APGR is 0.5 in expectation."""

    name = "random"
    paper = "RouteLLM baseline (Ong et al., arXiv 2406.18665)"

    def predict(self, dataset: QueryDataset, X_QD: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 0x5EED])
        return rng.random((dataset.num_queries, dataset.num_models))


@register
class CheapestRouter(QueryRouter):
    """Always the model with the lowest expected cost."""

    name = "cheapest"
    paper = "baseline"

    def predict(self, dataset: QueryDataset, X_QD: np.ndarray) -> np.ndarray:
        return np.zeros((dataset.num_queries, dataset.num_models))


@register
class BestSingleRouter(QueryRouter):
    """Every query gets each model's mean training score: at lambda 0 the best single model; swept
    over lambda, the single models on the cost-quality hull (RouterBench's 'zero router')."""

    name = "best-single"
    paper = "RouterBench zero router (Hu et al., arXiv 2403.12031)"

    def predict(self, dataset: QueryDataset, X_QD: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.context.target_QM.mean(axis=0), (dataset.num_queries, dataset.num_models)).copy()


@register
class OracleRouter(QueryRouter):
    """Reads the recorded outcomes of the queries it routes: the upper bound, not a router."""

    name = "oracle"
    paper = "upper bound"

    def predict(self, dataset: QueryDataset, X_QD: np.ndarray) -> np.ndarray:
        return self.context.scale(dataset.score_QM)

    def strong_scores(self, dataset: QueryDataset, X_QD: np.ndarray, strong: int, weak: int) -> np.ndarray:
        """The true gain of the strong model; equal gains are ordered at random (tiny seeded jitter) so
        that every decile threshold is an operating point, as for RouteLLM's optimal curve."""
        gain = self.predict(dataset, X_QD)
        jitter = np.random.default_rng([self.seed, 0x0AC1E]).random(dataset.num_queries) * 1e-6
        return gain[:, strong] - gain[:, weak] + jitter
