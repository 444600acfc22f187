"""Slow, obviously-correct references for the fast code paths (one token at a time)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from routelab.moe.experts import BatchedExperts


def reference_expert(experts: BatchedExperts, expert: int, x_D: torch.Tensor) -> torch.Tensor:
    """One expert applied to one token, written out from the weight tensors."""
    h = x_D @ experts.w_in_EDH[expert]
    if experts.activation == "swiglu":
        half = experts.d_hidden
        h = F.silu(h[:half]) * h[half:]
    elif experts.activation == "relu":
        h = F.relu(h)
    else:
        h = F.gelu(h)
    return h @ experts.w_out_EHD[expert]


def reference_moe(
    x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor, experts: BatchedExperts
) -> torch.Tensor:
    """``y_t = sum_k w_tk * expert_{idx_tk}(x_t)``, one token and one slot at a time."""
    rows = []
    for t in range(x_TD.shape[0]):
        y = x_TD.new_zeros(x_TD.shape[1])
        for slot in range(topk_idx_TK.shape[1]):
            expert = int(topk_idx_TK[t, slot])
            if expert < 0:
                continue
            y = y + topk_weight_TK[t, slot] * reference_expert(experts, expert, x_TD[t])
        rows.append(y)
    if not rows:
        return x_TD.new_zeros(0, x_TD.shape[1])
    return torch.stack(rows)


def reference_switch_loss(probs_TE: list[list[float]], chosen_T: list[list[int]]) -> float:
    """``E * sum_e f_e P_e`` with plain Python loops."""
    num_tokens, num_experts = len(probs_TE), len(probs_TE[0])
    counts = [0] * num_experts
    for experts in chosen_T:
        for e in experts:
            counts[e] += 1
    total = sum(counts)
    mean_p = [sum(row[e] for row in probs_TE) / num_tokens for e in range(num_experts)]
    return num_experts * sum(counts[e] / total * mean_p[e] for e in range(num_experts))


def reference_capacity_keep(expert_T: list[int], gate_T: list[float], capacity: int, policy: str) -> list[bool]:
    """Which top-1 assignments survive capacity: per expert, the best ``capacity`` by policy."""
    keep = [False] * len(expert_T)
    for e in set(expert_T):
        members = [t for t in range(len(expert_T)) if expert_T[t] == e]
        if policy == "probs":
            members.sort(key=lambda t: (-gate_T[t], t))
        for t in members[:capacity]:
            keep[t] = True
    return keep


def reference_balance(load: list[float]) -> dict[str, float]:
    """MaxVio, CV, normalised entropy of a load vector, from the definitions."""
    n = len(load)
    mean = sum(load) / n
    var = sum((c - mean) ** 2 for c in load) / n
    total = sum(load)
    entropy = -sum(c / total * math.log(c / total) for c in load if c > 0) / math.log(n)
    return {"max_vio": (max(load) - mean) / mean, "cv": math.sqrt(var) / mean, "entropy": entropy}
