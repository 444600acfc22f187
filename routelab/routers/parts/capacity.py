"""Expert capacity and token dropping (GShard, Switch; Megatron-Core ``get_capacity``).

``C = ceil(T * k / E * capacity_factor)``. Each expert keeps at most ``C`` assignments:
under ``drop_policy="probs"`` the ones with the highest gates, under ``"position"`` the
earliest tokens whatever the slot (Megatron-Core), under ``"choice_then_position"``
every token's first choice before any second choice, each choice by token order
(GShard Algorithm 1, fairseq ``top2gating``: a token never loses its top expert to an
earlier token's second choice). Dropped slots become ``-1`` with weight 0 (the token keeps its residual
path) and are counted in ``stats["dropped"]`` / ``stats["drop_rate"]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from routelab.core.validation import check_capacity_factor, check_choice
from routelab.routers.parts.router import RoutingDraft

DROP_POLICIES = ("probs", "position", "choice_then_position")


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """``ceil(T * k / E * capacity_factor)`` (Megatron-Core ``get_capacity``)."""
    return int(math.ceil(num_tokens * top_k / num_experts * capacity_factor))


def rank_within_expert(topk_idx_TK: torch.Tensor, priority_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For every assignment, its 0-based rank among the assignments of the same expert.

    Assignments are ordered by descending ``priority_TK`` (ties by token order); empty
    slots (``-1``) get a rank of ``T*K`` so that they are never kept.
    """
    num_slots = topk_idx_TK.numel()
    flat_idx = topk_idx_TK.reshape(-1)
    valid = flat_idx >= 0
    expert_key = torch.where(valid, flat_idx, torch.full_like(flat_idx, num_experts))
    by_priority = torch.argsort(-priority_TK.reshape(-1), stable=True)
    by_expert = by_priority[torch.argsort(expert_key[by_priority], stable=True)]
    counts = torch.bincount(expert_key, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    sorted_expert = expert_key[by_expert]
    rank_sorted = torch.arange(num_slots, device=flat_idx.device) - starts[sorted_expert]
    rank = torch.empty_like(rank_sorted)
    rank[by_expert] = rank_sorted
    rank = torch.where(valid, rank, torch.full_like(rank, num_slots))
    return rank.view_as(topk_idx_TK)


class Capacity(nn.Module):
    """Drop the assignments that exceed each expert's capacity.

    Args:
        capacity_factor: multiplier of the balanced load ``T*k/E`` (> 0).
        drop_policy: ``probs`` keeps the highest-gate assignments, ``position`` the earliest,
            ``choice_then_position`` the first choices (earliest first), then the second, ...
    """

    def __init__(self, capacity_factor: float, drop_policy: str = "probs") -> None:
        super().__init__()
        self.capacity_factor = check_capacity_factor(capacity_factor)
        self.drop_policy = check_choice("drop_policy", drop_policy, DROP_POLICIES)

    def extra_repr(self) -> str:
        return f"capacity_factor={self.capacity_factor}, drop_policy={self.drop_policy!r}"

    def forward(
        self, topk_idx_TK: torch.Tensor, gate_TK: torch.Tensor, draft: RoutingDraft
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        num_tokens, k_max = topk_idx_TK.shape
        capacity = expert_capacity(num_tokens, draft.top_k, draft.num_experts, self.capacity_factor)
        if self.drop_policy == "probs":
            priority_TK = gate_TK.detach()
        elif self.drop_policy == "position":
            order = torch.arange(num_tokens * k_max, device=topk_idx_TK.device, dtype=torch.float32)
            priority_TK = -order.view(num_tokens, k_max)
        else:  # choice_then_position: slot-major order
            order = torch.arange(num_tokens * k_max, device=topk_idx_TK.device, dtype=torch.float32)
            priority_TK = -order.view(k_max, num_tokens).t()
        rank_TK = rank_within_expert(topk_idx_TK, priority_TK, draft.num_experts)
        keep_TK = rank_TK < capacity
        topk_idx_TK = torch.where(keep_TK, topk_idx_TK, torch.full_like(topk_idx_TK, -1))
        gate_TK = torch.where(keep_TK, gate_TK, torch.zeros_like(gate_TK))
        return topk_idx_TK, gate_TK, capacity
