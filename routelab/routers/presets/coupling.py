"""Expert-router coupling (ERC) loss preset (Lv et al. 2025; spec §12)."""

from __future__ import annotations

from routelab.core.validation import check_non_negative
from routelab.routers.base import Router
from routelab.routers.coupling import ERCLoss, WeightExposingLinearScorer
from routelab.routers.presets.common import assemble_router, softmax_gate_mode
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset


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
