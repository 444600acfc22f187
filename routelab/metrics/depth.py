"""Depth-routing statistics over a trace whose layers hold depth decisions
(``routelab.depth.trace``): how often each layer runs each option, and how much compute
each token received - the router's view of token difficulty (Duo-LLM, arXiv 2410.10846,
measures difficulty as the loss a token gains from compute; a router that learned it
gives hard tokens more compute).

``compute_per_token`` = the mean over routed layers of the chosen option's cost (skip 0,
execute 1, repeat 2, small = its width share, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from routelab.core.errors import InputError


def option_rates(choice_T: np.ndarray, num_options: int) -> np.ndarray:
    """Share of tokens per option ``[num_options]`` (empty slots ignored)."""
    choice = np.asarray(choice_T).reshape(-1)
    choice = choice[choice >= 0]
    if choice.size == 0:
        return np.zeros(num_options)
    return np.bincount(choice, minlength=num_options)[:num_options] / choice.size


def compute_per_token(choices_LT: Sequence[np.ndarray], costs: Sequence[float]) -> np.ndarray:
    """Mean chosen-option cost over layers for every token ``[T]``."""
    cost = np.asarray(costs, dtype=np.float64)
    stacked = np.stack([np.asarray(c).reshape(-1) for c in choices_LT])
    if (stacked < 0).any():
        raise InputError("depth traces hold one decision per token and layer; found empty slots.")
    return cost[stacked].mean(axis=0)


def depth_summary(trace: Any, *, top_tokens: int = 10) -> dict[str, Any]:
    """Per-layer option rates, compute per token (overall, by domain, by token id)."""
    info = trace.metadata.get("depth")
    if not info:
        raise InputError("this trace holds no depth decisions (metadata 'depth' is missing).")
    options, costs = list(info["options"]), list(info["option_costs"])
    choices = [trace.topk_idx(layer)[:, 0] for layer in trace.layers]
    rates = {int(info["model_layers"][i]): dict(zip(options, option_rates(c, len(options)).tolist()))
             for i, c in enumerate(choices)}
    compute = compute_per_token(choices, costs)
    tokens = trace.tokens()
    by_domain = {}
    for code, name in enumerate(trace.domain_names):
        mask = tokens.domain == code
        if mask.any():
            by_domain[name] = float(compute[mask].mean())
    ids, inverse, counts = np.unique(tokens.token_id, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=compute)
    frequent = counts >= 5
    means = np.where(frequent, sums / np.maximum(counts, 1), np.nan)
    order = np.argsort(means[frequent])
    kept_ids, kept_means = ids[frequent][order], means[frequent][order]
    return {
        "options": options,
        "option_costs": costs,
        "rates": rates,
        "compute_mean": float(compute.mean()) if compute.size else 0.0,
        "compute_percentiles": {f"p{q}": float(np.percentile(compute, q)) for q in (10, 50, 90)} if compute.size else {},
        "compute_by_domain": by_domain,
        "least_compute_tokens": [(int(i), float(m)) for i, m in zip(kept_ids[:top_tokens], kept_means[:top_tokens])],
        "most_compute_tokens": [(int(i), float(m)) for i, m in zip(kept_ids[::-1][:top_tokens], kept_means[::-1][:top_tokens])],
    }
