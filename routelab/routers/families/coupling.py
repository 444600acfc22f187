"""Expert-router coupling (ERC) loss preset (Lv et al. 2025).

Expert-router coupling (ERC) loss (Lv, Ma, Ma & Qiao 2025, "Coupling Experts and
Routers in Mixture-of-Experts via an Auxiliary Loss", arXiv 2512.23447, ICLR 2026).

Each router row ``R_i`` is a proxy token for the tokens sent to expert i. Perturbed
proxies ``R~_i = R_i * delta_i``, ``delta_i ~ U(1 - eps_i, 1 + eps_i)^D`` with
``eps_i = min_{j != i} ||R_i - R_j|| / (2 ||R_i||)`` (recomputed every step, so the noise
never moves a proxy past the midpoint to another row), go through every expert's gate
projection ``W_g^j`` (``[D, H]``): ``M_ij = ||R~_i W_g^j||_2``. The loss asks that expert
i respond most to its own proxy and that proxy i excite expert i most:

    L = 1/E^2 * sum_i sum_{j != i} [relu(M_ij - alpha M_ii) + relu(M_ji - alpha M_ii)]

(the paper's Figure-8 pseudocode). ``alpha`` = 1 (best at 3B, E = 64) or 0.5 (15B,
E = 256). The proxies are used only by this loss; routing uses the clean ``R``. In eval
no noise is drawn. The loss coefficient is not stated in the material we read: it is an
option (default 1.0) [recon]. Cost ``O(E^2 D H)``, independent of the number of tokens.
"""

from __future__ import annotations

import torch

from routelab.core.validation import check_non_negative
from routelab.routers.parts.assembly import assemble_router, softmax_gate_mode
from routelab.routers.parts.expert_access import UsesExperts
from routelab.routers.parts.router import Router, RouterLoss, RoutingDraft
from routelab.routers.parts.scorers import LinearScorer
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset

def erc_noise_bound(router_weight_ED: torch.Tensor) -> torch.Tensor:
    """``eps_i = min_{j != i} ||R_i - R_j||_2 / (2 ||R_i||_2)`` for every row (0 for a single row)."""
    num_experts = router_weight_ED.shape[0]
    if num_experts < 2:
        return router_weight_ED.new_zeros(num_experts)
    dist_EE = torch.cdist(router_weight_ED, router_weight_ED)
    dist_EE = dist_EE + torch.diag(torch.full((num_experts,), float("inf"), device=dist_EE.device))
    return dist_EE.min(dim=1).values / (2.0 * router_weight_ED.norm(dim=1).clamp_min(1e-12))


def erc_activation_matrix(proxies_ED: torch.Tensor, gate_proj_EDH: torch.Tensor) -> torch.Tensor:
    """``M_ij = ||proxy_i W_g^j||_2``, shape ``[E, E]``."""
    act_EEH = torch.einsum("id,jdh->ijh", proxies_ED, gate_proj_EDH)
    return act_EEH.norm(dim=-1)


def erc_loss_from_matrix(m_EE: torch.Tensor, alpha: float) -> torch.Tensor:
    """The two hinge terms of ERC averaged over all ``E^2`` entries (diagonal zeroed)."""
    num_experts = m_EE.shape[0]
    diag_E1 = m_EE.diagonal().unsqueeze(1)
    off_diag = 1.0 - torch.eye(num_experts, device=m_EE.device, dtype=m_EE.dtype)
    expert_side = torch.relu(m_EE.transpose(0, 1) - alpha * diag_E1)  # [i, j] = relu(M_ji - a M_ii)
    proxy_side = torch.relu(m_EE - alpha * diag_E1)  # [i, j] = relu(M_ij - a M_ii)
    return ((expert_side + proxy_side) * off_diag).sum() / num_experts**2


class ERCLoss(RouterLoss, UsesExperts):
    """ERC loss; reads the router weight from the draft and the experts' gate projections.

    Args:
        coef: loss coefficient.
        alpha: margin factor ``alpha`` (1.0).
        noise: perturb the proxies in training (the paper does; without it the loss
            overfits to ``R``).
    """

    def __init__(self, coef: float, *, alpha: float, noise: bool, name: str = "erc") -> None:
        super().__init__(name, coef)
        self.alpha = check_non_negative("erc_alpha", alpha)
        self.noise = bool(noise)

    def forward(self, draft: RoutingDraft) -> torch.Tensor:
        router_ED = draft.extras["router_weight_ED"]
        gate_EDH = self.expert_gate_projection(draft.num_experts)
        eps_E = erc_noise_bound(router_ED.detach())
        proxies_ED = router_ED
        if draft.training and self.noise:
            u_ED = torch.rand_like(router_ED) * 2.0 - 1.0
            proxies_ED = router_ED * (1.0 + eps_E.unsqueeze(1) * u_ED)
        m_EE = erc_activation_matrix(proxies_ED, gate_EDH)
        draft.extra_stats["erc_noise_bound"] = eps_E.mean()
        draft.extra_stats["erc_gate_norm"] = gate_EDH.detach().norm(dim=(1, 2)).mean()
        return erc_loss_from_matrix(m_EE, self.alpha)


class WeightExposingLinearScorer(LinearScorer):
    """A ``LinearScorer`` that leaves its weight ``R`` (``[E, D]``, fp32) in
    ``draft.extras['router_weight_ED']`` for losses that regularise the router matrix."""

    def forward(self, x_TD: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        draft.extras["router_weight_ED"] = self.weight.float()
        return super().forward(x_TD, draft)


@register_preset(
    "erc",
    description="softmax top-k + expert-router coupling loss: perturbed router rows as proxy tokens through every "
    "expert's gate projection, hinge on M_ij vs alpha*M_ii (reads the layer's experts)",
    paper="Lv, Ma, Ma & Qiao 2025, Coupling Experts and Routers in MoE via an Auxiliary Loss (arXiv 2512.23447, ICLR 2026)",
    default_top_k=2,
    common_defaults={"aux_loss_coef": 1e-2},
)
def build_erc(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    erc_loss_coef: float = 1.0,
    erc_alpha: float = 1.0,
    erc_noise: bool = True,
    normalization: str = "auto",
) -> Router:
    """ERC: a Mixtral-style router (softmax top-k, renormalised for k > 1, Switch loss)
    plus ``erc_loss_coef * L_ERC``. ``L_ERC`` feeds the router rows ``R_i``, perturbed by
    ``U(1 - eps_i, 1 + eps_i)`` noise (``eps_i`` = half the distance to the nearest other
    row over ``||R_i||``), through every expert's gate projection and averages
    ``relu(M_ij - alpha M_ii) + relu(M_ji - alpha M_ii)`` over the ``E^2`` pairs
    (``alpha`` 1.0 at E=64, 0.5 at E=256 in the paper). The experts are the layer's
    (attached by ``routelab.MoE``); the coefficient is not given in the paper [recon].
    """
    erc_loss = ERCLoss(check_non_negative("erc_loss_coef", erc_loss_coef), alpha=erc_alpha, noise=erc_noise)
    scorer = WeightExposingLinearScorer(
        spec.d_model, spec.num_experts, init_std=common.router_init_std, jitter_eps=common.jitter_eps
    )
    return assemble_router(
        spec,
        common,
        scorer=scorer,
        gate_mode=softmax_gate_mode(normalization, spec.top_k),
        extra_losses=[erc_loss],
    )
