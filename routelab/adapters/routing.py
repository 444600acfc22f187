"""What every adapter router returns: a ``Routing`` (so stats, traces and reports work unchanged).

``AdapterRouting`` is a ``Routing`` with two optional extras: ``mixture_BGE`` (the
per-sequence skill weights of weight-space methods, Polytropon/MHR) and ``log_prob_T``
(the log-probability of each token's sampled expert subset, ReMix's policy gradient).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from routelab.core import Routing, TokenBatch
from routelab.core.routing_stats import routing_stats


@dataclass
class AdapterRouting(Routing):
    """A ``Routing`` over LoRA experts.

    Attributes:
        mixture_BGE: ``[batch, heads, skills]`` weights of a weight-space mixture (the
            update is then computed by ``mixed_delta``); None for output-space routing.
        log_prob_T: ``[T]`` log-probability of each token's sampled subset (ReMix), else None.
    """

    mixture_BGE: torch.Tensor | None = None
    log_prob_T: torch.Tensor | None = None


def build_routing(
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    logits_TE: torch.Tensor,
    scores_TE: torch.Tensor,
    num_experts: int,
    *,
    losses: dict[str, torch.Tensor] | None = None,
    aux_loss: torch.Tensor | None = None,
    mixture_BGE: torch.Tensor | None = None,
    log_prob_T: torch.Tensor | None = None,
) -> AdapterRouting:
    """Assemble an ``AdapterRouting`` with the standard per-batch statistics."""
    topk_weight_TK = torch.where(topk_idx_TK >= 0, topk_weight_TK, torch.zeros_like(topk_weight_TK))
    stats = routing_stats(topk_idx_TK, num_experts)
    stats["effective_support"] = effective_support_size(topk_idx_TK, topk_weight_TK.detach())
    return AdapterRouting(
        topk_idx=topk_idx_TK,
        topk_weight=topk_weight_TK,
        logits=logits_TE,
        scores=scores_TE,
        num_experts=num_experts,
        losses=losses or {},
        aux_loss=aux_loss if aux_loss is not None else logits_TE.new_zeros(()),
        stats=stats,
        mixture_BGE=mixture_BGE,
        log_prob_T=log_prob_T,
    )


def effective_support_size(topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``1 / sum_e w_e^2`` with the token's weights normalised to sum to 1.

    ReMix (arXiv 2603.10160) uses it to show that softmax routers collapse to one expert
    even at k > 1; constant weights over k experts give exactly k. Tokens without an
    expert count as 0.
    """
    with torch.no_grad():
        w_TK = torch.where(topk_idx_TK >= 0, topk_weight_TK.float().abs(), torch.zeros_like(topk_weight_TK, dtype=torch.float32))
        total_T = w_TK.sum(dim=1)
        if w_TK.shape[0] == 0:
            return torch.zeros((), device=w_TK.device)
        p_TK = w_TK / total_T.clamp_min(1e-20).unsqueeze(1)
        ess_T = torch.where(total_T > 0, 1.0 / p_TK.square().sum(dim=1).clamp_min(1e-20), torch.zeros_like(total_T))
        return ess_T.mean()


class AdapterRouter(nn.Module, ABC):
    """Decides how the experts of one LoRA bank combine for the tokens of one call.

    ``forward(x_TD, batch, task_ids_T)`` gets the real tokens ``[T, d_in]``, their layout
    and each token's task id (``-1`` = unknown, None when no task ids were given) and
    returns an ``AdapterRouting``.
    """


    @abstractmethod
    def forward(self, x_TD: torch.Tensor, batch: TokenBatch, task_ids_T: torch.Tensor | None) -> AdapterRouting:
        ...


def dense_slots(num_tokens: int, num_experts: int, device: torch.device) -> torch.Tensor:
    """``[T, E]`` slot map that sends every token to every expert in order."""
    return torch.arange(num_experts, device=device).expand(num_tokens, num_experts)
