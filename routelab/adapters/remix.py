"""ReMix: routing LoRA mixtures with constant weights and a leave-one-out policy gradient.

ReMix (arXiv 2603.10160). Softmax routers over LoRA experts collapse: the effective
support size ``1 / sum w^2`` falls to about 1 even with k > 1. ReMix keeps router weights
out of the forward pass: in training each token samples k distinct experts from
``pi = softmax(W_r x)`` (Gumbel-top-k, i.e. sequential sampling without replacement) and
uses them with constant weights ``1/k``; at inference it takes the top-k of the logits,
again with ``1/k``. The router learns by REINFORCE with the leave-one-out baseline (RLOO):
with M sampled selections per input and their losses ``L_m``, the router gradient is
``(1/M) sum_m (L_m - mean_{j != m} L_j) grad log pi(S_m)`` (``rloo_surrogate``).
``log pi(S)`` is the sum of the sequential without-replacement terms. No code was
published; the subset probability and ``omega = 1/k`` follow the paper's description.
"""

from __future__ import annotations

import torch
from torch import nn

from routelab.adapters.routing import AdapterRouter, AdapterRouting, build_routing
from routelab.core import ConfigError, InputError, TokenBatch
from routelab.core.validation import check_positive_int, check_top_k


def subset_log_prob(logits_TE: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
    """``log pi(S)`` of an ordered without-replacement sample: ``sum_i l_{s_i} - logsumexp(l over
    the experts not yet drawn)``; ``[T]``, differentiable in the logits."""
    remaining_TE = logits_TE
    total_T = logits_TE.new_zeros(logits_TE.shape[0])
    for slot in range(idx_TK.shape[1]):  # k slots (not a loop over experts)
        chosen_T1 = idx_TK[:, slot : slot + 1]
        total_T = total_T + remaining_TE.gather(1, chosen_T1).squeeze(1) - remaining_TE.logsumexp(dim=1)
        remaining_TE = remaining_TE.scatter(1, chosen_T1, float("-inf"))
    return total_T


def rloo_advantages(losses_M: torch.Tensor) -> torch.Tensor:
    """``A_m = L_m - mean_{j != m} L_j`` along dim 0 (needs ``M >= 2``)."""
    num = losses_M.shape[0]
    if num < 2:
        raise ConfigError(f"RLOO needs at least 2 samples per input (num_samples >= 2), got {num}.")
    return losses_M - (losses_M.sum(dim=0, keepdim=True) - losses_M) / (num - 1)


def rloo_surrogate(losses_MB: torch.Tensor, log_prob_MB: torch.Tensor) -> torch.Tensor:
    """Scalar whose gradient is the RLOO router gradient ``(1/M) sum_m A_m grad log pi(S_m)``,
    averaged over the inputs ``B`` (add it to the loss you descend on)."""
    advantages_MB = rloo_advantages(losses_MB.detach())
    return (advantages_MB * log_prob_MB).mean(dim=0).mean()


class ReMixRouter(AdapterRouter):
    """Linear router, Gumbel-top-k sampling in training, top-k at inference, constant weights.

    Args:
        weight: the constant weight of each selected expert (default ``1/k``).
    """

    def __init__(self, num_experts: int, d_in: int, *, top_k: int = 2, weight: float | None = None,
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.top_k = check_top_k(top_k, num_experts)
        self.weight = 1.0 / self.top_k if weight is None else float(weight)
        if self.weight <= 0:
            raise ConfigError(f"weight must be > 0, got {weight}.")
        self.proj = nn.Linear(d_in, num_experts, bias=False)
        nn.init.normal_(self.proj.weight, std=init_std)

    def forward(self, x_TD: torch.Tensor, batch: TokenBatch, task_ids_T: torch.Tensor | None) -> AdapterRouting:
        if not torch.isfinite(x_TD).all():
            raise InputError("ReMix router input holds NaN or Inf.")
        logits_TE = x_TD.float() @ self.proj.weight.float().T
        if self.training:
            uniform_TE = torch.rand_like(logits_TE).clamp(1e-10, 1 - 1e-7)
            perturbed_TE = logits_TE.detach() - torch.log(-torch.log(uniform_TE))
            idx_TK = perturbed_TE.topk(self.top_k, dim=-1).indices
            log_prob_T = subset_log_prob(logits_TE, idx_TK)
        else:
            idx_TK = logits_TE.topk(self.top_k, dim=-1).indices
            log_prob_T = None
        weight_TK = torch.full(idx_TK.shape, self.weight, device=x_TD.device)
        return build_routing(idx_TK, weight_TK, logits_TE, logits_TE.softmax(-1), self.num_experts, log_prob_T=log_prob_T)
