"""Per-batch routing statistics (balance, drops, coverage) computed from a top-k map.

Definitions: MaxVio (Wang et al. 2024, arXiv 2408.15664) = (max load - mean load) / mean load; CV = population std / mean; entropy is the
entropy of the load distribution divided by ln E (1 = perfectly balanced).
"""

from __future__ import annotations

import math

import torch


def expert_load(topk_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Number of assignments per expert (float32 ``[E]``); ``-1`` slots are ignored."""
    flat = topk_idx_TK.reshape(-1)
    flat = flat[flat >= 0]
    return torch.bincount(flat, minlength=num_experts).to(torch.float32)


def balance_stats(load_E: torch.Tensor) -> dict[str, torch.Tensor]:
    """MaxVio, CV, normalised entropy and dead-expert count of a load vector.

    With zero total load every value is 0 (nothing was routed, so nothing is unbalanced).
    """
    load_E = load_E.to(torch.float32)
    num_experts = load_E.numel()
    total = load_E.sum()
    mean = total / max(num_experts, 1)
    if float(total) <= 0:
        zero = torch.zeros((), device=load_E.device)
        return {"max_vio": zero, "cv": zero.clone(), "entropy": zero.clone(), "dead_experts": zero.clone()}
    max_vio = (load_E.max() - mean) / mean
    cv = load_E.std(unbiased=False) / mean
    p = load_E / total
    plogp = torch.where(p > 0, p * p.clamp_min(1e-30).log(), torch.zeros_like(p))
    entropy = -plogp.sum() / math.log(num_experts) if num_experts > 1 else torch.ones((), device=load_E.device)
    dead = (load_E == 0).sum().to(torch.float32)
    return {"max_vio": max_vio, "cv": cv, "entropy": entropy, "dead_experts": dead}


def routing_stats(
    topk_idx_TK: torch.Tensor,
    num_experts: int,
    *,
    selected_assignments: int | torch.Tensor | None = None,
    load_before_drop_E: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """All per-batch statistics of a (post-capacity) top-k map.

    Args:
        topk_idx_TK: int64 ``[T, K]`` expert ids, ``-1`` for empty slots.
        num_experts: ``E``.
        selected_assignments: how many assignments the selector made before capacity
            dropping (defaults to the kept ones, i.e. no drops).
        load_before_drop_E: per-expert load before dropping (defaults to the kept load).
    """
    with torch.no_grad():
        load = expert_load(topk_idx_TK, num_experts)
        kept = load.sum()
        selected = kept if selected_assignments is None else torch.as_tensor(
            selected_assignments, dtype=torch.float32, device=load.device
        )
        dropped = (selected - kept).clamp_min(0)
        drop_rate = dropped / selected if float(selected) > 0 else torch.zeros((), device=load.device)
        num_tokens = topk_idx_TK.shape[0]
        active_TK = topk_idx_TK >= 0
        active_per_token = active_TK.sum(dim=1)
        stats = {
            "load": load,
            "load_before_drop": load if load_before_drop_E is None else load_before_drop_E.to(torch.float32),
            **balance_stats(load),
            "drop_rate": drop_rate,
            "dropped": dropped,
            "tokens_without_expert": (active_per_token == 0).sum().to(torch.float32),
            "active_experts_per_token": (
                active_per_token.to(torch.float32).mean() if num_tokens else torch.zeros((), device=load.device)
            ),
            "num_tokens": torch.tensor(float(num_tokens), device=load.device),
        }
    return stats


def stats_to_python(stats: dict[str, torch.Tensor]) -> dict[str, float | list[float]]:
    """Convert a stats dict to plain floats (lists for per-expert vectors), for logging."""
    out: dict[str, float | list[float]] = {}
    for key, value in stats.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.item() if value.dim() == 0 else value.detach().cpu().tolist()
        else:
            out[key] = value
    return out
