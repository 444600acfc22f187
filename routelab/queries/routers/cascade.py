"""Cascade: call the cheapest model first and escalate while the answer's judged quality is below a
threshold (FrugalGPT, Chen et al., arXiv 2305.05176; AutoMix, Aggarwal et al., arXiv 2310.12963).

Replayed on recorded outcomes, the answer scorer is RouterBench's simulated judge (Hu et al.,
arXiv 2403.12031, cascading router with a judge error): it sees the recorded score of the
answer (rescaled to [0, 1]) plus Gaussian noise of standard deviation ``judge_noise`` (0 = a
perfect judge). Every model tried is paid for; the answer kept is the last one. Sweeping the
threshold traces the cost-quality curve.
"""

from __future__ import annotations

import numpy as np

from routelab.core.errors import ConfigError
from routelab.queries.base import LAMBDAS, OperatingPoint, QueryRouter, register
from routelab.queries.dataset import QueryDataset


@register
class CascadeRouter(QueryRouter):
    name = "cascade"
    paper = "cascade with a simulated answer judge (FrugalGPT arXiv 2305.05176; RouterBench arXiv 2403.12031)"
    kind = "cascade"

    def __init__(self, seed: int = 0, judge_noise: float = 0.2, thresholds: int = 41) -> None:
        super().__init__(seed)
        if judge_noise < 0 or thresholds < 2:
            raise ConfigError("cascade: judge_noise must be >= 0 and thresholds >= 2.")
        self.judge_noise, self.thresholds = judge_noise, thresholds

    def confidence(self, dataset: QueryDataset) -> np.ndarray:
        """The simulated judge's verdict on every recorded answer (a fixed draw per seed)."""
        rng = np.random.default_rng([self.seed, 0xCA5CADE])
        noise = rng.normal(0.0, self.judge_noise, size=dataset.score_QM.shape) if self.judge_noise > 0 else 0.0
        return np.clip(self.context.scale(dataset.score_QM) + noise, 0.0, 1.0)

    def stops(self, confidence_QM: np.ndarray, threshold: float) -> np.ndarray:
        """Index (in cost order) of the model whose answer is kept, per query."""
        accept = confidence_QM[:, self.order] >= threshold
        accept[:, -1] = True
        return np.argmax(accept, axis=1)

    def operating_points(self, dataset: QueryDataset, X_QD: np.ndarray, lambdas: np.ndarray = LAMBDAS
                         ) -> list[OperatingPoint]:
        self.order = np.argsort(self.context.cost_M, kind="stable")
        confidence = self.confidence(dataset)
        paid_cum = np.cumsum(dataset.cost_QM[:, self.order], axis=1)
        points = []
        for threshold in np.append(np.linspace(0.0, 1.0, self.thresholds), np.inf):  # inf: always escalate
            stop = self.stops(confidence, float(threshold))
            rows = np.arange(len(stop))
            points.append(OperatingPoint(float(threshold), self.order[stop], paid_cum[rows, stop]))
        return points

    def strong_scores(self, dataset: QueryDataset, X_QD: np.ndarray, strong: int, weak: int) -> np.ndarray:
        """Two models: the cascade escalates from the cheaper one when its judged answer is poor."""
        self.order = np.argsort(self.context.cost_M, kind="stable")
        first = self.order[0]
        confidence = self.confidence(dataset)[:, first]
        return -confidence if first == weak else confidence
