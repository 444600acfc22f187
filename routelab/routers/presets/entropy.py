"""Entropy-driven presets: DynMoLE hybrid Tsallis routing and MAGNET two-stage weighting (spec §15)."""

from __future__ import annotations

from routelab.core.validation import check_non_negative
from routelab.routers.base import Router
from routelab.routers.entropy import DynMoLEBalanceLoss, DynMoLEEntropyLoss, DynMoLESelector, MagnetLoss
from routelab.routers.presets.common import assemble_router, softmax_gate_mode
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset


@register_preset(
    "dynmole",
    description="top-p (cumsum <= 0.75) keeping at least top_k=2, all experts when normalised Tsallis entropy "
    "(q=1.1) > 0.9; raw-probability gates; entropy loss 1e-2 + masked balance loss 1e-3",
    paper="Li et al. 2025, DynMoLE: Boosting Mixture of LoRA Experts Fine-Tuning with a Hybrid Routing Mechanism "
    "(arXiv 2504.00661)",
    default_top_k=2,
    exemptions={"weights_sum_to_one": "gates are the raw softmax probabilities of the active experts (not renormalised)"},
)
def build_dynmole(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    top_p: float = 0.75,
    entropy_threshold: float = 0.9,
    entropy_index: float = 1.1,
    entropy_kind: str = "tsallis",
    entropy_eps: float = 1e-5,
    dynmole_entropy_coef: float = 1e-2,
    dynmole_aux_coef: float = 1e-3,
) -> Router:
    """DynMoLE hybrid routing: ``p = softmax(z)``; the experts whose sorted cumulative
    probability is ``<= top_p``, always at least the first ``top_k`` (DynMoLE's
    ``keep_top_k``); every expert for tokens whose normalised Tsallis entropy
    ``S_q(p) / S_q(uniform)`` (``q = entropy_index``) exceeds ``entropy_threshold``. Gates
    are ``p`` unnormalised. Losses: ``dynmole_entropy_coef * mean_t S_q`` (normalised) and
    ``dynmole_aux_coef * E * sum_e f_e P_e`` with ``f_e`` the mean masked probability.
    Defaults are those of the DynMoLE code (``mikecovlee/DynMoLE``).
    """
    extra_losses = [
        DynMoLEEntropyLoss(check_non_negative("dynmole_entropy_coef", dynmole_entropy_coef)),
        DynMoLEBalanceLoss(check_non_negative("dynmole_aux_coef", dynmole_aux_coef)),
    ]
    selector = DynMoLESelector(
        spec.num_experts,
        spec.top_k,
        top_p=top_p,
        threshold=entropy_threshold,
        entropy_index=entropy_index,
        entropy_kind=entropy_kind,
        eps=entropy_eps,
    )
    return assemble_router(spec, common, selector=selector, gate_mode="none", extra_losses=extra_losses)


@register_preset(
    "magnet",
    description="softmax top-k with a two-stage entropy loss: reward marginal entropy (coverage) until the routing "
    "entropy EMA falls below a trigger, then penalise per-token entropy (specialisation), one-way",
    paper="Dai, Fang & Cai 2026, MAGNET: Modality-Guided Mixture of Graph Experts with Entropy-Triggered Routing "
    "(arXiv 2602.20723)",
    default_top_k=2,
)
def build_magnet(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    coverage_weight: float = 1e-2,
    specialization_weight: float = 1e-2,
    entropy_trigger: float = 0.5,
    entropy_ema_decay: float = 0.9,
    ramp_steps: int = 1000,
    patience: int = 0,
    normalization: str = "auto",
) -> Router:
    """MAGNET entropy-triggered two-stage weighting [recon]: stage 1 adds
    ``-coverage_weight * H(mean_t p_t) / ln E``; after each optimizer step the EMA of
    ``mean_t H(p_t) / ln E`` is updated and, the first time it is below
    ``entropy_trigger`` (or has not improved for ``patience`` steps, when > 0), the loss
    switches for good to ``+specialization_weight * ramp * mean_t H(p_t) / ln E``
    (``ramp`` rising to 1 over ``ramp_steps``). Router: softmax top-k, renormalised for
    k > 1. The stage is a buffer, saved with the model.
    """
    magnet_loss = MagnetLoss(
        coverage_weight=coverage_weight,
        specialization_weight=specialization_weight,
        trigger=entropy_trigger,
        ema_decay=entropy_ema_decay,
        ramp_steps=ramp_steps,
        patience=patience,
    )
    return assemble_router(
        spec, common, gate_mode=softmax_gate_mode(normalization, spec.top_k), extra_losses=[magnet_loss]
    )
