"""Geometric routers: low-dimensional cosine routing, SRA, parameter-free online k-means (spec §6, §7)."""

from __future__ import annotations

from routelab.core.validation import check_choice, check_non_negative
from routelab.routers.base import Router, RouterLoss
from routelab.routers.cosine import BandpassLoss, CosineScorer, default_band
from routelab.routers.gates import GateNorm
from routelab.routers.kmeans import OnlineKMeansScorer, UniformGate
from routelab.routers.presets.common import assemble_router, softmax_gate_mode
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset

_TOP1_RAW = "holds for top_k > 1; top-1 keeps the full-softmax probability so the router still gets a gradient"


def cosine_router(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    proj_dim: int | None,
    tau_init: float,
    learn_tau: bool,
    normalization: str,
    bandpass_loss_coef: float,
    bandpass_low: float | None,
    bandpass_high: float | None,
) -> Router:
    extra_losses: list[RouterLoss] = []
    coef = check_non_negative("bandpass_loss_coef", bandpass_loss_coef)
    if coef:
        low, high = default_band(spec.num_experts)
        low = low if bandpass_low is None else bandpass_low
        high = high if bandpass_high is None else bandpass_high
        extra_losses.append(BandpassLoss(coef, low, high))
    return assemble_router(
        spec,
        common,
        scorer=CosineScorer(spec.d_model, spec.num_experts, proj_dim=proj_dim, tau_init=tau_init, learn_tau=learn_tau),
        gate_mode=softmax_gate_mode(normalization, spec.top_k),
        extra_losses=extra_losses,
    )


@register_preset(
    "cosine",
    description="z = |tau| cos(P x, c_e) with a d_s=64 projection and learned centroids; softmax over all, "
    "top-k renormalised for k>1",
    paper="Equifinality in Mixture-of-Experts Routing (arXiv 2604.14419), low-dimensional cosine router",
    default_top_k=2,
    exemptions={"weights_sum_to_one": _TOP1_RAW},
)
def build_cosine(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    proj_dim: int | None = 64,
    tau_init: float = 10.0,
    learn_tau: bool = True,
    normalization: str = "auto",
    bandpass_loss_coef: float = 0.0,
    bandpass_low: float | None = None,
    bandpass_high: float | None = None,
) -> Router:
    """Low-dimensional cosine routing: ``u = P x`` (``proj_dim`` = d_s; None = no projection),
    ``z = |tau| cos(u, c_e)`` with learnable ``tau`` (init 10) and orthogonally initialised
    centroids; softmax over all experts, top-k, renormalised for k > 1. Optional SRA
    bandpass loss (``bandpass_loss_coef``; band defaults to SRA's 1e-3..2e-2 at 128
    experts, scaled to ``E``). Multi-hop application with relative-norm halting:
    ``routelab.moe.apply_hops``.
    """
    return cosine_router(
        spec, common, proj_dim=proj_dim, tau_init=tau_init, learn_tau=learn_tau, normalization=normalization,
        bandpass_loss_coef=bandpass_loss_coef, bandpass_low=bandpass_low, bandpass_high=bandpass_high,
    )


@register_preset(
    "sra",
    description="cosine routing against anchors in the model space (no projection), learnable |tau|, "
    "bandpass balance loss 0.4",
    paper="Semantic Resonance Architecture (ITernovtsii/semantic-resonance), cosine routing + bandpass loss",
    default_top_k=1,
    exemptions={"weights_sum_to_one": _TOP1_RAW},
)
def build_sra(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    tau_init: float = 10.0,
    normalization: str = "auto",
    bandpass_loss_coef: float = 0.4,
    bandpass_low: float | None = None,
    bandpass_high: float | None = None,
) -> Router:
    """SRA: ``z = |tau| cos(x, a_e)`` (anchors ``a_e`` orthogonal, ``tau`` init 10), softmax over
    all experts, top-k (renormalised for k > 1), bandpass loss ``E^2 mean_e[relu(p_lo -
    P_e)^2 + relu(P_e - p_hi)^2]`` with weight 0.4. SRA's 1e-3..2e-2 band was set for 128
    experts; by default it is scaled to ``E`` (0.128/E..2.56/E). SRA's top-k schedule
    (1 -> 4 at epoch 3) is a training-loop matter and not part of the router.
    """
    return cosine_router(
        spec, common, proj_dim=None, tau_init=tau_init, learn_tau=True, normalization=normalization,
        bandpass_loss_coef=bandpass_loss_coef, bandpass_low=bandpass_low, bandpass_high=bandpass_high,
    )


@register_preset(
    "kmeans",
    description="parameter-free: centroids are running means of the routed (normalised) hidden states, "
    "updated in end_of_step; top-k by cosine",
    paper="Routers Learn the Geometry of Their Experts (arXiv 2605.12476), online k-means router",
    default_top_k=1,
)
def build_kmeans(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    kmeans_tau: float = 10.0,
    kmeans_gate: str = "softmax",
    kmeans_update: str = "mean",
    kmeans_ema_rate: float = 0.05,
    kmeans_init: str = "kmeans++",
    kmeans_reseed_after: int = 100,
    seed: int | None = None,
) -> Router:
    """Online k-means routing [update details recon]: experts = top-k of ``cos(x, mu_e)``;
    gates = ``softmax(kmeans_tau * cos)`` renormalised over the selection (``kmeans_gate=
    'softmax'``) or ``1/k`` (``'uniform'``). Centroids are running means (or EMA with rate
    ``kmeans_ema_rate``) of the routed ``x/||x||``, applied once per optimizer step in
    ``end_of_step``; initialised by k-means++ (or random tokens) on the first training
    batch; a centroid unused for ``kmeans_reseed_after`` steps is re-seeded. No trainable
    parameters.
    """
    check_choice("kmeans_gate", kmeans_gate, ("softmax", "uniform"))
    scorer = OnlineKMeansScorer(
        spec.d_model,
        spec.num_experts,
        spec.top_k,
        tau=kmeans_tau,
        update=kmeans_update,
        ema_rate=kmeans_ema_rate,
        init=kmeans_init,
        reseed_after=kmeans_reseed_after,
        seed=seed,
    )
    return assemble_router(
        spec, common, scorer=scorer, gate_norm=GateNorm("renorm") if kmeans_gate == "softmax" else UniformGate()
    )
