"""Dynamic-k presets: top-p routing (An et al. 2024) and DynaMoE (Gülmez 2026), spec §9."""

from __future__ import annotations

from routelab.core.validation import check_choice, check_non_negative
from routelab.routers.base import Router
from routelab.routers.dynamic_k import EntropyLoss, PercentileSelector, TopPSelector
from routelab.routers.presets.common import assemble_router
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset

_RAW_GATES = "gates are raw softmax probabilities of the kept experts (not renormalised), as in the paper"


@register_preset(
    "top-p",
    description="dynamic-k: keep experts until their cumulative probability exceeds P (0.4); raw-probability gates; "
    "entropy (dynamic) loss 1e-4 + Switch loss 1e-2",
    paper="Huang, An et al. 2024, Harder Tasks Need More Experts: Dynamic Routing in MoE Models (arXiv 2403.07652, ACL 2024)",
    default_top_k=2,
    common_defaults={"aux_loss_coef": 1e-2},
    exemptions={"weights_sum_to_one": _RAW_GATES},
)
def build_top_p(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    top_p: float = 0.4,
    dynamic_loss_coef: float = 1e-4,
    max_experts: int | None = None,
) -> Router:
    """Top-p routing of "Harder Tasks Need More Experts": ``p = softmax(z)`` sorted
    descending; every expert up to and including the first whose cumulative probability
    exceeds ``top_p`` is used (at least one, at most ``max_experts`` when set). Gates are
    the raw ``p``. Losses: the dynamic loss ``mean_t H(p_t)`` (``dynamic_loss_coef``; the
    coefficients 1e-4 / 1e-2 are unverified) and the Switch balance loss
    (``aux_loss_coef``). ``top_k`` is only the nominal k of ``capacity_factor``.
    """
    entropy_loss = EntropyLoss(check_non_negative("dynamic_loss_coef", dynamic_loss_coef))
    return assemble_router(
        spec,
        common,
        selector=TopPSelector(spec.num_experts, top_p, max_experts),
        gate_mode="none",
        extra_losses=[entropy_loss],
    )


@register_preset(
    "dynamoe",
    description="dynamic-k: experts with p >= the batch's q-quantile (0.9) of probabilities, 1..top_k per token; "
    "per-layer top_k from routelab.routers.schedules.layer_top_k",
    paper="Gülmez 2026, DynaMoE: Dynamic Token-Level Expert Activation with Layer-Wise Adaptive Capacity "
    "(arXiv 2603.01697)",
    default_top_k=2,
    common_defaults={"aux_loss_coef": 1e-2},
)
def build_dynamoe(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    percentile: float = 0.9,
    percentile_scope: str = "batch",
    normalization: str = "renorm",
) -> Router:
    """DynaMoE percentile-thresholded gating [recon]: ``tau`` is the ``percentile``
    quantile of all router probabilities of the batch (``percentile_scope='token'``: of
    each token's); a token uses the experts with ``p >= tau``, at least 1 and at most
    ``top_k`` (= the layer's ``K_l``; give each layer its own with
    ``routelab.routers.schedules.layer_top_k``). Gates are renormalised over the used
    experts (``normalization='none'`` keeps raw probabilities) [recon]. Switch balance
    loss 1e-2 [recon].
    """
    check_choice("normalization", normalization, ("renorm", "none"))
    return assemble_router(
        spec,
        common,
        selector=PercentileSelector(spec.num_experts, spec.top_k, percentile, percentile_scope),
        gate_mode=normalization,
    )
