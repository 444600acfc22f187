"""Expert-router coupling (ERC) loss preset (Lv et al. 2025; spec §12)."""

from __future__ import annotations

from routelab.core.validation import check_non_negative
from routelab.routers.base import Router
from routelab.routers.coupling import ERCLoss, WeightExposingLinearScorer
from routelab.routers.gates import GateNorm
from routelab.routers.presets.common import capacity_stage, softmax_gate_mode, standard_losses
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset
from routelab.routers.score_functions import Softmax
from routelab.routers.selectors import TopK


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
    losses = standard_losses(common)
    losses.append(ERCLoss(check_non_negative("erc_loss_coef", erc_loss_coef), alpha=erc_alpha, noise=erc_noise))
    scorer = WeightExposingLinearScorer(
        spec.d_model, spec.num_experts, init_std=common.router_init_std, jitter_eps=common.jitter_eps
    )
    return Router(
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        scorer=scorer,
        score_fn=Softmax(),
        selector=TopK(spec.num_experts, spec.top_k),
        gate_norm=GateNorm(softmax_gate_mode(normalization, spec.top_k)),
        losses=losses,
        capacity=capacity_stage(common),
    )
