"""LoRA-Mixer: hard-soft routing of LoRA experts with a routing-specialisation loss.

LoRA-Mixer (arXiv 2507.00029; the public repository holds only a README, so the details
below are a reconstruction, kept configurable). A token-level router at each routed
projection (the paper places LoRA experts on attention q/k/v/o or SSM in/out
projections); hard top-k selection in the forward pass with soft softmax gradients to all
experts (straight-through ``w = hard + p - sg(p)``, ``hard`` the renormalised top-k
probabilities, detached). In training every expert is evaluated, so all receive their
straight-through gradient (their forward weight is 0); at inference only the top-k run.
Loss ("RSL"): ``balance_coef * E * sum_e f_e Pbar_e + entropy_coef * (mean_t H(p_t) - H(mean_t p_t))``
— balanced load, confident tokens, diverse marginal. Regime 2 of the paper (frozen public
LoRAs, only routers trained) is ``AdapterSet.freeze_experts()``.
"""

from __future__ import annotations

import torch
from torch import nn

from routelab.adapters.routing import AdapterRouter, AdapterRouting, build_routing, dense_slots
from routelab.core import TokenBatch
from routelab.core.routing_stats import routing_stats
from routelab.core.validation import check_non_negative, check_positive_int, check_top_k


def entropy(p_XE: torch.Tensor) -> torch.Tensor:
    return -(p_XE * p_XE.clamp_min(1e-20).log()).sum(dim=-1)


class LoRAMixerRouter(AdapterRouter):
    """See the module docstring."""

    def __init__(self, num_experts: int, d_in: int, *, top_k: int = 2, balance_coef: float = 1e-2,
                 entropy_coef: float = 1e-2, init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.top_k = check_top_k(top_k, num_experts)
        self.balance_coef = check_non_negative("balance_coef", balance_coef)
        self.entropy_coef = check_non_negative("entropy_coef", entropy_coef)
        self.proj = nn.Linear(d_in, num_experts, bias=False)
        nn.init.normal_(self.proj.weight, std=init_std)

    def forward(self, x_TD: torch.Tensor, batch: TokenBatch, task_ids_T: torch.Tensor | None) -> AdapterRouting:
        logits_TE = x_TD.float() @ self.proj.weight.float().T
        probs_TE = logits_TE.softmax(dim=-1)
        top_w_TK, top_idx_TK = probs_TE.topk(self.top_k, dim=-1)
        hard_TK = (top_w_TK / top_w_TK.sum(dim=-1, keepdim=True)).detach()
        losses = self.losses(probs_TE, top_idx_TK)
        aux = self.balance_coef * losses["rsl_balance"] + self.entropy_coef * losses["rsl_entropy"]
        if not self.training:
            return build_routing(top_idx_TK, hard_TK, logits_TE, probs_TE, self.num_experts, losses=losses, aux_loss=aux)
        hard_TE = torch.zeros_like(probs_TE).scatter(1, top_idx_TK, hard_TK)
        weight_TE = hard_TE + probs_TE - probs_TE.detach()
        idx_TE = dense_slots(x_TD.shape[0], self.num_experts, x_TD.device)
        routing = build_routing(idx_TE, weight_TE, logits_TE, probs_TE, self.num_experts, losses=losses, aux_loss=aux)
        routing.stats.update(routing_stats(top_idx_TK, self.num_experts))  # load of the hard selection
        return routing

    def losses(self, probs_TE: torch.Tensor, top_idx_TK: torch.Tensor) -> dict[str, torch.Tensor]:
        if probs_TE.shape[0] == 0:
            zero = probs_TE.new_zeros(())
            return {"rsl_balance": zero, "rsl_entropy": zero}
        mask_TE = torch.zeros_like(probs_TE).scatter(1, top_idx_TK, 1.0)
        fraction_E = mask_TE.mean(dim=0) / self.top_k
        balance = self.num_experts * (fraction_E * probs_TE.mean(dim=0)).sum()
        shaping = entropy(probs_TE).mean() - entropy(probs_TE.mean(dim=0, keepdim=True)).squeeze(0)
        return {"rsl_balance": balance, "rsl_entropy": shaping}
