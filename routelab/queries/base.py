"""What every query router shares: the fit context, operating points, and the registry.

A query router scores every (query, model) pair with a predicted quality ``score_hat_QM``
(in units of the dataset's score rescaled to [0, 1] on the training split); a decision rule
turns scores into one model per query (``routelab.queries.decisions``). Routers that decide
sequentially (a cascade reads each answer's judged quality; a bandit learns online from the
one outcome it sees) produce their operating points themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from routelab.core.errors import ConfigError
from routelab.core.registry import Registry
from routelab.queries.dataset import QueryDataset

# Utility trade-offs swept for the cost-quality curve: lambda in quality units (score rescaled to
# [0, 1]) per cost of the most expensive model's average call.
LAMBDAS = np.unique(np.concatenate([[0.0], np.linspace(0.01, 1.0, 40), np.logspace(0.0, 2.0, 5)]))


@dataclass
class ScoreScale:
    """Affine map of raw scores to [0, 1] fitted on the training split (e.g. judge scores 1-10)."""

    low: float
    high: float

    @classmethod
    def fit(cls, score_QM: np.ndarray) -> ScoreScale:
        low, high = float(score_QM.min()), float(score_QM.max())
        return cls(low, high if high > low else low + 1.0)

    def __call__(self, score: np.ndarray) -> np.ndarray:
        return (np.asarray(score, dtype=np.float64) - self.low) / (self.high - self.low)


@dataclass
class FitContext:
    """What a router may learn from: the training split, its features and normalised targets."""

    train: QueryDataset
    X_QD: np.ndarray
    target_QM: np.ndarray  # training scores rescaled to [0, 1]
    cost_M: np.ndarray  # expected cost per call, relative to the most expensive model (max = 1)
    scale: ScoreScale
    seed: int


@dataclass
class OperatingPoint:
    """One setting of a router's trade-off: the model it picked and the dollars it paid, per query."""

    param: float
    choice_Q: np.ndarray
    paid_Q: np.ndarray
    extra: dict[str, Any] | None = None


def utility_choice(score_hat_QM: np.ndarray, cost_M: np.ndarray, lam: float) -> np.ndarray:
    """``argmax_m score_hat - lam * cost`` per query; ties go to the cheaper model."""
    order = np.argsort(cost_M, kind="stable")
    utility = score_hat_QM[:, order] - lam * cost_M[order][None, :]
    return order[np.argmax(utility, axis=1)]


class QueryRouter:
    """Base class. Subclasses set ``name``/``paper``, take their options as keyword arguments,
    and implement ``fit`` and ``predict`` (or override ``operating_points``)."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    kind: ClassVar[str] = "score"  # "score", "cascade" or "bandit"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.context: FitContext | None = None

    def fit(self, context: FitContext) -> QueryRouter:
        self.context = context
        return self

    def predict(self, dataset: QueryDataset, X_QD: np.ndarray) -> np.ndarray:
        raise ConfigError(f"router {self.name!r} has no per-query scores (it decides sequentially).")

    def strong_scores(self, dataset: QueryDataset, X_QD: np.ndarray, strong: int, weak: int) -> np.ndarray | None:
        """Two models: the score thresholded for 'call the strong model' (higher = strong)."""
        score_hat = self.predict(dataset, X_QD)
        return score_hat[:, strong] - score_hat[:, weak]

    def operating_points(self, dataset: QueryDataset, X_QD: np.ndarray, lambdas: np.ndarray = LAMBDAS
                         ) -> list[OperatingPoint]:
        """The utility rule at every lambda (one scoring pass)."""
        score_hat = self.predict(dataset, X_QD)
        cost_M = self.context.cost_M
        points = []
        for lam in lambdas:
            choice = utility_choice(score_hat, cost_M, float(lam))
            points.append(OperatingPoint(float(lam), choice, dataset.cost_QM[np.arange(len(choice)), choice]))
        return points


ROUTERS: Registry[type[QueryRouter]] = Registry("query router", "router")


def register(cls: type[QueryRouter]) -> type[QueryRouter]:
    ROUTERS.add(cls.name, cls)
    return cls


def create_query_router(name: str, seed: int = 0, **options: Any) -> QueryRouter:
    """Build a registered query router by name (``list_query_routers()`` names them)."""
    from routelab.queries import routers  # noqa: F401  (registers the built-in routers)

    cls = ROUTERS.get(name)
    try:
        return cls(seed=seed, **options)
    except TypeError as error:
        raise ConfigError(f"router {name!r}: {error}. Options: {router_options(cls)}.") from None


def router_options(cls: type[QueryRouter]) -> list[str]:
    import inspect

    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "seed")]


def list_query_routers() -> list[dict[str, str]]:
    from routelab.queries import routers  # noqa: F401

    return [{"name": cls.name, "kind": cls.kind, "paper": cls.paper, "options": ", ".join(router_options(cls))}
            for cls in ROUTERS]


class single_thread:
    """Run a block on one CPU thread (torch and the BLAS under numpy/scikit-learn), then restore.

    Fitting a small router is thousands of tiny matrix products; splitting each over threads
    costs more in synchronisation than it saves (30x slower on a busy 2-core machine)."""

    def __enter__(self) -> single_thread:
        import torch
        from threadpoolctl import threadpool_limits

        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self._limits = threadpool_limits(limits=1)
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self._threads)
        self._limits.restore_original_limits()
