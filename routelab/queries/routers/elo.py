"""Similarity-weighted ranking (RouteLLM ``sw_ranking``; Ong et al., arXiv 2406.18665, section 4.1).

For a query q, every training query n is a 'battle' between each pair of models (the higher
score wins, equal scores are a tie = half a win each), weighted by RouteLLM's
``10 * 10 ** (sim(q, n) / max_n sim(q, n))`` with cosine similarity of the embeddings. A
Bradley-Terry model is fitted to the weighted battles (maximum likelihood, no penalty, as
RouteLLM's ``compute_elo_mle_with_tie``): closed form for two models, Hunter's (2004) MM
iterations otherwise. P(strong wins) = sigmoid(theta_strong - theta_weak) (= RouteLLM's Elo
win rate). A model's score is its mean win probability against the others.
"""

from __future__ import annotations

import numpy as np

from routelab.queries.base import FitContext, QueryRouter, register
from routelab.queries.dataset import QueryDataset


def battle_wins(target_QM: np.ndarray) -> np.ndarray:
    """``wins[n, i, j]``: 1 if model i beat j on query n, 0.5 for a tie, 0 otherwise (diagonal 0)."""
    diff = target_QM[:, :, None] - target_QM[:, None, :]
    wins = (diff > 0).astype(np.float64) + 0.5 * (diff == 0)
    idx = np.arange(target_QM.shape[1])
    wins[:, idx, idx] = 0.0
    return wins


def bradley_terry(wins_QMM: np.ndarray, iterations: int = 200, tol: float = 1e-10) -> np.ndarray:
    """Bradley-Terry log-strengths per query from weighted win counts (MM algorithm; mean 0)."""
    Q, M, _ = wins_QMM.shape
    games = wins_QMM + wins_QMM.transpose(0, 2, 1)
    won = wins_QMM.sum(axis=2)
    p = np.ones((Q, M))
    for _ in range(iterations):
        denom = (games / (p[:, :, None] + p[:, None, :])).sum(axis=2)
        new = np.maximum(won, 1e-300) / np.maximum(denom, 1e-300)
        new /= np.exp(np.log(new).mean(axis=1, keepdims=True))
        if np.max(np.abs(new - p) / p) < tol:
            p = new
            break
        p = new
    theta = np.log(p)
    return theta - theta.mean(axis=1, keepdims=True)


@register
class SimilarityWeightedEloRouter(QueryRouter):
    name = "sw-ranking"
    paper = "RouteLLM similarity-weighted ranking (Ong et al., arXiv 2406.18665)"

    def __init__(self, seed: int = 0, chunk: int = 512) -> None:
        super().__init__(seed)
        self.chunk = chunk

    def fit(self, context: FitContext) -> SimilarityWeightedEloRouter:
        super().fit(context)
        M = context.target_QM.shape[1]
        self.wins_flat = battle_wins(context.target_QM).reshape(len(context.target_QM), M * M)
        return self

    def log_strengths(self, X_QD: np.ndarray) -> np.ndarray:
        M = self.context.target_QM.shape[1]
        theta = np.empty((len(X_QD), M))
        for start in range(0, len(X_QD), self.chunk):
            sims = X_QD[start:start + self.chunk].astype(np.float64) @ self.context.X_QD.T.astype(np.float64)
            weights = 10.0 * 10.0 ** (sims / sims.max(axis=1, keepdims=True))
            wins = (weights @ self.wins_flat).reshape(-1, M, M)
            if M == 2:
                log_ratio = np.log(np.maximum(wins[:, 0, 1], 1e-300)) - np.log(np.maximum(wins[:, 1, 0], 1e-300))
                theta[start:start + self.chunk] = np.column_stack([log_ratio / 2, -log_ratio / 2])
            else:
                theta[start:start + self.chunk] = bradley_terry(wins)
        return theta

    def predict(self, dataset: QueryDataset, X_QD: np.ndarray) -> np.ndarray:
        theta = self.log_strengths(X_QD)
        M = theta.shape[1]
        win = 1.0 / (1.0 + np.exp(-(theta[:, :, None] - theta[:, None, :])))
        return (win.sum(axis=2) - 0.5) / (M - 1)

    def strong_scores(self, dataset: QueryDataset, X_QD: np.ndarray, strong: int, weak: int) -> np.ndarray:
        theta = self.log_strengths(X_QD)
        return 1.0 / (1.0 + np.exp(-(theta[:, strong] - theta[:, weak])))
