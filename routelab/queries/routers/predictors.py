"""Per-model quality predictors on query embeddings: kNN, MLP and logistic regression
(the RouterBench/LLMRouter baselines; Hu et al., arXiv 2403.12031; Shnitzer et al., arXiv 2309.15789)."""

from __future__ import annotations

import numpy as np

from routelab.core.errors import ConfigError
from routelab.queries.base import FitContext, QueryRouter, register, single_thread
from routelab.queries.dataset import QueryDataset


@register
class KNNRouter(QueryRouter):
    """Mean score of each model on the ``k`` training queries most cosine-similar to the query;
    ``weighting="similarity"`` weights neighbours by their (non-negative) cosine similarity."""

    name = "knn"
    paper = "kNN router (RouterBench, arXiv 2403.12031; LLMRouter knnrouter)"

    def __init__(self, seed: int = 0, k: int = 10, weighting: str = "similarity", chunk: int = 2048) -> None:
        super().__init__(seed)
        if k < 1:
            raise ConfigError(f"knn: k must be >= 1, got {k}.")
        if weighting not in ("uniform", "similarity"):
            raise ConfigError(f"knn: weighting={weighting!r} must be 'uniform' or 'similarity'.")
        self.k, self.weighting, self.chunk = k, weighting, chunk

    def predict(self, dataset: QueryDataset, X_QD: np.ndarray) -> np.ndarray:
        import torch  # a matmul and top-k over all training queries: torch's multi-threaded kernels

        train_X = torch.from_numpy(np.ascontiguousarray(self.context.X_QD, dtype=np.float32))
        target = torch.from_numpy(self.context.target_QM.astype(np.float32))
        X = torch.from_numpy(np.ascontiguousarray(X_QD, dtype=np.float32))
        k = min(self.k, len(train_X))
        out = np.empty((len(X_QD), target.shape[1]))
        for start in range(0, len(X_QD), self.chunk):
            near, idx = torch.topk(X[start:start + self.chunk] @ train_X.T, k, dim=1)
            weights = torch.ones_like(near) if self.weighting == "uniform" else near.clamp_min(0.0) + 1e-6
            weights = weights / weights.sum(dim=1, keepdim=True)
            out[start:start + self.chunk] = torch.einsum("qk,qkm->qm", weights, target[idx]).double().numpy()
        return out


@register
class MLPRouter(QueryRouter):
    """A multi-output MLP regressor (scikit-learn) from the embedding to every model's score."""

    name = "mlp"
    paper = "MLP router (RouterBench, arXiv 2403.12031)"

    def __init__(self, seed: int = 0, hidden: int = 64, alpha: float = 1e-3, max_iter: int = 60,
                 batch_size: int = 256) -> None:
        super().__init__(seed)
        self.hidden, self.alpha, self.max_iter, self.batch_size = hidden, alpha, max_iter, batch_size

    def fit(self, context: FitContext) -> MLPRouter:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPRegressor

        super().fit(context)
        self.model = MLPRegressor(hidden_layer_sizes=(self.hidden,), alpha=self.alpha, max_iter=self.max_iter,
                                  batch_size=min(self.batch_size, len(context.X_QD)), early_stopping=True, random_state=self.seed)
        with warnings.catch_warnings(), single_thread():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.filterwarnings("ignore", message="Got `batch_size`")  # small sets: one batch, as intended
            self.model.fit(context.X_QD, context.target_QM)
        return self

    def predict(self, dataset: QueryDataset, X_QD: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict(X_QD), dtype=np.float64).reshape(len(X_QD), -1)


@register
class LogisticRouter(QueryRouter):
    """One logistic regression per model predicting P(good answer); a score s in [0, 1] counts as a
    positive example of weight s and a negative one of weight 1 - s (exact for 0/1 scores)."""

    name = "logistic"
    paper = "per-model correctness classifiers (Shnitzer et al., arXiv 2309.15789)"

    def __init__(self, seed: int = 0, C: float = 1.0, max_iter: int = 300) -> None:
        super().__init__(seed)
        self.C, self.max_iter = C, max_iter

    def fit(self, context: FitContext) -> LogisticRouter:
        from sklearn.linear_model import LogisticRegression

        super().fit(context)
        X = context.X_QD
        n = len(X)
        X2 = np.concatenate([X, X])
        y2 = np.concatenate([np.ones(n), np.zeros(n)])
        self.models = []
        for m in range(context.target_QM.shape[1]):
            s = np.clip(context.target_QM[:, m], 0.0, 1.0)
            weights = np.concatenate([s, 1.0 - s])
            if s.min() == s.max() and s[0] in (0.0, 1.0):
                self.models.append(float(s[0]))  # one class only: its constant rate
                continue
            clf = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)
            with single_thread():
                clf.fit(X2, y2, sample_weight=weights)
            self.models.append(clf)
        return self

    def predict(self, dataset: QueryDataset, X_QD: np.ndarray) -> np.ndarray:
        cols = [np.full(len(X_QD), m) if isinstance(m, float) else m.predict_proba(X_QD)[:, 1] for m in self.models]
        return np.column_stack(cols)
