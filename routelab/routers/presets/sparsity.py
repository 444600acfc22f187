"""MoE-X sparsity-aware routing preset (Yang et al. 2025; spec §14)."""

from __future__ import annotations

from routelab.routers.base import Router
from routelab.routers.presets.common import assemble_router, softmax_gate_mode
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset
from routelab.routers.sparsity_aware import SparsityAwareScorer


@register_preset(
    "moe-x",
    description="route to the experts whose ReLU activation is estimated sparsest, rho = Phi(mean/std) from the "
    "experts' encoder-weight statistics (no router weights; use activation='relu')",
    paper="Yang et al. 2025, Mixture of Experts Made Intrinsically Interpretable (MoE-X, arXiv 2503.07639)",
    default_top_k=2,
)
def build_moe_x(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    moex_stats: str = "per-input",
    moex_score: str = "neg",
    moex_temperature: float = 1.0,
    normalization: str = "auto",
) -> Router:
    """MoE-X sparsity-aware routing [recon]: logits ``-rho_j(x) / tau`` where ``rho_j`` is
    the Gaussian estimate of the fraction of expert j's hidden units that fire on ``x``
    (``moex_stats='per-input'``: weight mean/variance per input feature, default;
    ``'per-expert'``: one mean/std per expert, the spec's reading; ``moex_score='log'``
    uses ``log(1 - rho)``). Top-k; gates are the softmax over the selected logits. The
    statistics come from the layer's expert weights (attached by ``routelab.MoE``); the
    paper's experts are ReLU MLPs: build the layer with ``activation='relu'``.
    """
    return assemble_router(
        spec,
        common,
        scorer=SparsityAwareScorer(spec.num_experts, stats=moex_stats, score=moex_score, temperature=moex_temperature),
        gate_mode=softmax_gate_mode(normalization, spec.top_k),
    )
