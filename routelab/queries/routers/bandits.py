"""Contextual bandits replayed online: only the chosen model's outcome is revealed.

Reward of calling model m on query q: score (rescaled to [0, 1]) - lambda * cost (relative to
the most expensive model). Context: the first ``context_dim`` embedding dimensions plus a
constant. The bandit first learns from a replay of the training split (``warm_start``),
then routes the test split online, still learning; both streams are shuffled by the seed.

* ``linucb``: disjoint LinUCB (Li et al., WWW 2010, arXiv 1003.0146), as in GreenServ
  (arXiv 2601.17551).
* ``thompson``: linear Thompson sampling (Agrawal & Goyal, ICML 2013, arXiv 1209.3352).

Regret is measured on the test stream against the best fixed model in hindsight.
"""

from __future__ import annotations

import time
from abc import abstractmethod

import numpy as np

from routelab.core.errors import ConfigError
from routelab.queries.base import OperatingPoint, QueryRouter, register
from routelab.queries.dataset import QueryDataset
from routelab.queries.metrics import bandit_regret

BANDIT_LAMBDAS = np.array([0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0])


class LinearBandit(QueryRouter):
    kind = "bandit"

    def __init__(self, seed: int = 0, context_dim: int = 32, ridge: float = 1.0, warm_start: bool = True) -> None:
        super().__init__(seed)
        if context_dim < 1 or ridge <= 0:
            raise ConfigError(f"{self.name}: context_dim must be >= 1 and ridge > 0.")
        self.context_dim, self.ridge, self.warm_start = context_dim, ridge, warm_start

    def features(self, X_QD: np.ndarray) -> np.ndarray:
        x = X_QD[:, : self.context_dim].astype(np.float64)
        return np.column_stack([x, np.ones(len(x))])

    def reset(self, M: int, d: int) -> None:
        self.A_inv = np.stack([np.eye(d) / self.ridge for _ in range(M)])
        self.b = np.zeros((M, d))

    def update(self, arm: int, x: np.ndarray, reward: float) -> None:
        Ax = self.A_inv[arm] @ x
        self.A_inv[arm] -= np.outer(Ax, Ax) / (1.0 + x @ Ax)
        self.b[arm] += reward * x

    @abstractmethod
    def choose(self, x: np.ndarray, rng: np.random.Generator) -> int:
        """The arm (index in cost order) to call for context ``x``."""

    def replay(self, x_QD: np.ndarray, reward_QM: np.ndarray, order: np.ndarray, rng: np.random.Generator
               ) -> np.ndarray:
        chosen = np.empty(len(order), dtype=np.int64)
        for t, q in enumerate(order):
            arm = self.choose(x_QD[q], rng)
            self.update(arm, x_QD[q], reward_QM[q, arm])
            chosen[t] = arm
        return chosen

    def operating_points(self, dataset: QueryDataset, X_QD: np.ndarray, lambdas: np.ndarray | None = None
                         ) -> list[OperatingPoint]:
        context = self.context
        lambdas = BANDIT_LAMBDAS
        # arms in cost order so that ties go to the cheaper model
        self.arm_order = np.argsort(context.cost_M, kind="stable")
        cost = context.cost_M[self.arm_order]
        train_x, test_x = self.features(context.X_QD), self.features(X_QD)
        train_target = context.target_QM[:, self.arm_order]
        test_target = context.scale(dataset.score_QM)[:, self.arm_order]
        points = []
        for lam in lambdas:
            rng = np.random.default_rng([self.seed, 0xBA4D17])
            self.reset(len(cost), train_x.shape[1])
            if self.warm_start:
                self.replay(train_x, train_target - lam * cost, rng.permutation(len(train_x)), rng)
            order = rng.permutation(len(test_x))
            reward = test_target - lam * cost
            start = time.perf_counter()
            chosen_stream = self.replay(test_x, reward, order, rng)
            test_replay_s = time.perf_counter() - start
            chosen = np.empty(len(test_x), dtype=np.int64)
            chosen[order] = chosen_stream
            regret, best = bandit_regret(reward[order], chosen_stream)
            choice = self.arm_order[chosen]
            points.append(OperatingPoint(float(lam), choice, dataset.cost_QM[np.arange(len(choice)), choice],
                                         {"regret": regret, "best_fixed": int(self.arm_order[best]),
                                          "test_replay_s": test_replay_s}))
        return points

    def strong_scores(self, dataset: QueryDataset, X_QD: np.ndarray, strong: int, weak: int) -> None:
        return None


@register
class LinUCBRouter(LinearBandit):
    name = "linucb"
    paper = "LinUCB (Li et al., arXiv 1003.0146); GreenServ (arXiv 2601.17551)"

    def __init__(self, seed: int = 0, context_dim: int = 32, ridge: float = 1.0, warm_start: bool = True,
                 alpha: float = 1.0) -> None:
        super().__init__(seed, context_dim, ridge, warm_start)
        self.alpha = alpha

    def choose(self, x: np.ndarray, rng: np.random.Generator) -> int:
        Ax = self.A_inv @ x  # [M, d]
        theta = np.einsum("mij,mj->mi", self.A_inv, self.b)
        ucb = theta @ x + self.alpha * np.sqrt(np.maximum(Ax @ x, 0.0))
        return int(np.argmax(ucb))


@register
class ThompsonRouter(LinearBandit):
    name = "thompson"
    paper = "linear Thompson sampling (Agrawal & Goyal, arXiv 1209.3352)"

    def __init__(self, seed: int = 0, context_dim: int = 32, ridge: float = 1.0, warm_start: bool = True,
                 v: float = 0.2) -> None:
        super().__init__(seed, context_dim, ridge, warm_start)
        self.v = v

    def choose(self, x: np.ndarray, rng: np.random.Generator) -> int:
        theta = np.einsum("mij,mj->mi", self.A_inv, self.b)
        mean = theta @ x
        std = self.v * np.sqrt(np.maximum(np.einsum("mi,mij,mj->m", np.broadcast_to(x, theta.shape), self.A_inv,
                                                    np.broadcast_to(x, theta.shape)), 0.0))
        # theta~ ~ N(theta, v^2 A^-1) enters only through x . theta~ ~ N(x . theta, v^2 x A^-1 x), per arm
        return int(np.argmax(mean + std * rng.standard_normal(len(mean))))
