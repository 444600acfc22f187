"""Matrix factorisation router (RouteLLM ``mf``; Ong et al., arXiv 2406.18665, section 4.1).

delta(m, q) = w^T (normalize(v_m) * (W e_q)): a projection of the query embedding, an
L2-normalised embedding per model, and a linear read-out, as RouteLLM's ``MFModel``.
Default training, as RouteLLM: pairwise wins, P(m_i beats m_j | q) = sigmoid(delta_i - delta_j)
with binary cross-entropy over every pair of models whose scores differ on a training query
(ties are skipped). ``objective="scores"`` instead fits sigmoid(delta(m, q)) to each model's
rescaled score. The score of a model is delta (a logit), used as its predicted quality.
"""

from __future__ import annotations

import numpy as np

from routelab.core.errors import ConfigError
from routelab.queries.base import FitContext, QueryRouter, register, single_thread
from routelab.queries.dataset import QueryDataset


@register
class MatrixFactorisationRouter(QueryRouter):
    name = "mf"
    paper = "RouteLLM matrix factorisation (Ong et al., arXiv 2406.18665)"

    def __init__(self, seed: int = 0, dim: int = 64, objective: str = "pairwise", epochs: int = 10,
                 lr: float = 3e-3, weight_decay: float = 1e-5, batch_size: int = 256) -> None:
        super().__init__(seed)
        if objective not in ("pairwise", "scores"):
            raise ConfigError(f"mf: objective={objective!r} must be 'pairwise' or 'scores'.")
        if dim < 1 or epochs < 1 or batch_size < 1:
            raise ConfigError("mf: dim, epochs and batch_size must be >= 1.")
        self.dim, self.objective, self.epochs = dim, objective, epochs
        self.lr, self.weight_decay, self.batch_size = lr, weight_decay, batch_size

    def fit(self, context: FitContext) -> MatrixFactorisationRouter:
        with single_thread():
            return self._fit(context)

    def _fit(self, context: FitContext) -> MatrixFactorisationRouter:
        import torch

        super().fit(context)
        generator = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        D, M = context.X_QD.shape[1], context.target_QM.shape[1]
        self.proj = torch.nn.Linear(D, self.dim, bias=False)
        self.model_emb = torch.nn.Embedding(M, self.dim)
        self.readout = torch.nn.Linear(self.dim, 1, bias=False)
        params = [*self.proj.parameters(), *self.model_emb.parameters(), *self.readout.parameters()]
        optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        X = torch.from_numpy(np.ascontiguousarray(context.X_QD, dtype=np.float32))
        target = context.target_QM
        if self.objective == "pairwise":
            q, i, j = np.nonzero(target[:, :, None] > target[:, None, :])
            if len(q) == 0:
                raise ConfigError("mf: no training query where two models' scores differ; nothing to learn from.")
            data = [torch.from_numpy(a.astype(np.int64)) for a in (q, i, j)]
        else:
            q, m = np.indices(target.shape).reshape(2, -1)
            data = [torch.from_numpy(q), torch.from_numpy(m), torch.from_numpy(target.reshape(-1).astype(np.float32))]
        n = len(data[0])
        loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, self.batch_size):
                batch = order[start:start + self.batch_size]
                if self.objective == "pairwise":
                    qb, ib, jb = (d[batch] for d in data)
                    logits = self._delta(X[qb], ib) - self._delta(X[qb], jb)
                    loss = loss_fn(logits, torch.ones_like(logits))
                else:
                    qb, mb, yb = (d[batch] for d in data)
                    loss = loss_fn(self._delta(X[qb], mb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return self

    def _delta(self, x, model_idx):
        import torch

        v = torch.nn.functional.normalize(self.model_emb(model_idx), p=2, dim=-1)
        return self.readout(v * self.proj(x)).squeeze(-1)

    def predict(self, dataset: QueryDataset, X_QD: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            v = torch.nn.functional.normalize(self.model_emb.weight, p=2, dim=-1)  # [M, dim]
            w = self.readout.weight[0]  # [dim]
            projected = self.proj(torch.from_numpy(np.ascontiguousarray(X_QD, dtype=np.float32)))  # [Q, dim]
            return (projected @ (v * w).T).double().numpy()

    def strong_scores(self, dataset: QueryDataset, X_QD: np.ndarray, strong: int, weak: int) -> np.ndarray:
        """P(strong beats weak | q) = sigmoid(delta_strong - delta_weak), RouteLLM's win rate."""
        delta = self.predict(dataset, X_QD)
        return 1.0 / (1.0 + np.exp(-(delta[:, strong] - delta[:, weak])))
