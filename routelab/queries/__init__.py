"""Query -> LLM routing (level 4): pick the model for each query under a cost budget.

Offline replay over recorded per-query outcomes of several LLMs (nothing calls an LLM):
shipped datasets and a loader for your own table (``loaders``), a strict price registry
(``prices``), offline embedders (``embedders``), routers (``list_query_routers``), decision
rules with calibration and fallback (``decisions``), metrics (``metrics``: AIQ, APGR, CPT,
oracle gap, regret) and the evaluation harness (``evaluate``, ``experiment``, ``report``).
"""

from routelab.queries.base import LAMBDAS, FitContext, QueryRouter, create_query_router, list_query_routers
from routelab.queries.dataset import QueryDataset
from routelab.queries.decisions import (
    Calibration,
    Decision,
    RoutingPolicy,
    calibrate_budget,
    calibrate_lambda,
    calibrate_share,
)
from routelab.queries.embedders import CallableEmbedder, PrecomputedEmbedder, TfidfSvdEmbedder
from routelab.queries.loaders import list_datasets, load_dataset, load_table
from routelab.queries.prices import CostConvention, Price, PriceRegistry

__all__ = [
    "LAMBDAS",
    "Calibration",
    "CallableEmbedder",
    "CostConvention",
    "Decision",
    "FitContext",
    "PrecomputedEmbedder",
    "Price",
    "PriceRegistry",
    "QueryDataset",
    "QueryRouter",
    "RoutingPolicy",
    "TfidfSvdEmbedder",
    "calibrate_budget",
    "calibrate_lambda",
    "calibrate_share",
    "create_query_router",
    "list_datasets",
    "list_query_routers",
    "load_dataset",
    "load_table",
]
