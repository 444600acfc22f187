"""Dropless dispatch: sort assignments by expert -> batched experts -> weighted scatter-add.

Reads only ``topk_idx``/``topk_weight`` of a ``Routing``; empty slots (``-1``) are skipped,
so capacity drops, dynamic-k and expert choice need no special case.
"""

from __future__ import annotations

import torch

from routelab.moe.experts import BatchedExperts


def sort_by_expert(topk_idx_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order of the valid assignments grouped by expert (stable), and the count per expert.

    Returns ``(assignment_N, counts_E)``: ``assignment_N`` indexes the flattened ``[T*K]``
    slots; empty slots are left out.
    """
    flat = topk_idx_TK.reshape(-1)
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)
    counts_E = counts[:num_experts]
    num_valid = int(flat.numel() - counts[num_experts])
    return order[:num_valid], counts_E


def dispatch_combine(
    x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor, experts: BatchedExperts
) -> torch.Tensor:
    """``y_t = sum_k w_tk * expert_{idx_tk}(x_t)`` for every token, skipping empty slots."""
    num_tokens, k_max = topk_idx_TK.shape
    assignment_N, counts_E = sort_by_expert(topk_idx_TK, experts.num_experts)
    token_N = torch.div(assignment_N, k_max, rounding_mode="floor")
    x_ND = x_TD.index_select(0, token_N)
    weight_N = topk_weight_TK.reshape(-1).index_select(0, assignment_N)
    y_ND = experts.forward_sorted(x_ND, counts_E, weight_N)
    out_TD = y_ND.new_zeros(num_tokens, x_TD.shape[-1])
    return out_TD.index_add(0, token_N, y_ND)
