"""Optimal-transport presets: BASE layers, Megatron Sinkhorn, Selective Sinkhorn Routing (spec §3)."""

from __future__ import annotations

from routelab.core.errors import ConfigError
from routelab.core.validation import check_non_negative
from routelab.routers.base import Router
from routelab.routers.base_layers import BalancedAssignmentSelector, CentroidAffinityScorer
from routelab.routers.presets.common import assemble_router, softmax_gate_mode
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset
from routelab.routers.score_functions import Sigmoid, Softmax
from routelab.routers.sinkhorn_routing import MegatronSinkhornSelector, SelectiveSinkhornSelector

@register_preset(
    "base",
    description="BASE layers: exactly balanced assignment (auction) in training, greedy in eval, gate sigmoid(x.c_e)",
    paper="Lewis et al. 2021, BASE Layers: Simplifying Training of Large, Sparse Models (arXiv 2103.16716)",
    default_top_k=1,
    exemptions={"weights_sum_to_one": "the gate is sigmoid(x . c_e) of the assigned expert, as in BASE layers"},
)
def build_base(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    base_solver: str = "auction",
    auction_eps: float = 0.02,
    auction_max_rounds: int = 200,
    auction_init: str = "sinkhorn",
    warm_start: bool = False,
    centroid_init_gain: float = 0.1,
) -> Router:
    """BASE layers. Training assigns exactly ``T*k/E`` tokens to every expert by an
    eps-scaling auction on the affinities ``x . c_e`` (final eps = ``auction_eps`` times
    their range; fairseq uses 1/50) or exactly with ``base_solver='hungarian'`` (top-1,
    O(T^3), for small batches). Evaluation takes the greedy top-k. The gate is
    ``sigmoid(x . c_e)``; centroids start orthogonal with gain 0.1. The auction starts from
    the prices of an entropic relaxation (``auction_init='sinkhorn'``; ``'zero'`` runs
    eps-scaling from zero prices) or, with ``warm_start=True``, from the previous step's
    prices.
    """
    for option in ("aux_loss_coef", "seq_aux_loss_coef"):
        if getattr(common, option):
            raise ConfigError(f"router 'base' balances by assignment and takes no balance loss; set {option}=0.")
    return assemble_router(
        spec,
        common,
        scorer=CentroidAffinityScorer(
            spec.d_model, spec.num_experts, init_gain=check_non_negative("centroid_init_gain", centroid_init_gain)
        ),
        score_fn=Sigmoid(),
        selector=BalancedAssignmentSelector(
            spec.num_experts,
            spec.top_k,
            solver=base_solver,
            auction_eps=auction_eps,
            auction_max_rounds=auction_max_rounds,
            auction_init=auction_init,
            warm_start=warm_start,
        ),
        gate_mode="none",
    )


@register_preset(
    "sinkhorn",
    description="Megatron Sinkhorn router: top-k of the Sinkhorn plan of exp(z) in training, gates sigmoid/softmax(z)",
    paper="Megatron-Core sinkhorn_load_balancing (Shoeybi et al. 2019); BlackMamba, Anthony et al. 2024 (arXiv 2402.01771)",
    default_top_k=1,
    exemptions={
        "weights_sum_to_one": "gates are sigmoid(z) (k=1) or softmax(z) (k>1) at the selection, not renormalised "
        "(Megatron)",
    },
)
def build_sinkhorn(
    spec: RouterSpec, common: CommonOptions, *, sinkhorn_tol: float = 1e-4, sinkhorn_iters: int = 100
) -> Router:
    """Megatron's Sinkhorn router. Training: under no_grad, log-domain Sinkhorn on ``exp(z)``
    (rows 1/T, columns 1/E) until the mean relative change of the column scaling is below
    ``sinkhorn_tol`` or ``sinkhorn_iters`` iterations; experts = top-k of each plan row.
    Gates = ``sigmoid(z)`` for k=1, ``softmax(z)`` for k>1, not renormalised. Evaluation:
    plain top-k. Megatron refuses an aux loss with this router; so does this preset.
    """
    for option in ("aux_loss_coef", "seq_aux_loss_coef"):
        if getattr(common, option):
            raise ConfigError(f"router 'sinkhorn' does not take a balance loss (as in Megatron); set {option}=0.")
    return assemble_router(
        spec,
        common,
        score_fn=Sigmoid() if spec.top_k == 1 else Softmax(),
        selector=MegatronSinkhornSelector(spec.num_experts, spec.top_k, tol=sinkhorn_tol, max_iter=sinkhorn_iters),
        gate_mode="none",
    )


@register_preset(
    "ssr",
    description="Selective Sinkhorn Routing: transport-map gates on a fraction p_sel of training forwards, "
    "softmax top-k otherwise, no aux loss",
    paper="Nguyen et al. 2025, Selective Sinkhorn Routing for Improved Sparse Mixture of Experts (arXiv 2511.08972)",
    default_top_k=2,
    exemptions={
        "weights_sum_to_one": "holds for top_k > 1; top-1 keeps the raw softmax probability on non-Sinkhorn forwards",
    },
)
def build_ssr(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    p_sel: float = 0.01,
    xi: float = 0.05,
    ssr_cost: str = "softmax",
    noise_std: float = 0.0,
    sinkhorn_grad: str = "unrolled",
    ssr_draw: str = "forward",
    normalization: str = "auto",
    sinkhorn_tol: float = 1e-4,
    sinkhorn_iters: int = 100,
    seed: int | None = None,
) -> Router:
    """Selective Sinkhorn Routing [paper; several details recon, see docs/routers-transport-balancing-geometry-relu.md].

    With probability ``p_sel`` a training forward solves ``max <Pi,C> - xi <Pi,log Pi>``
    (rows sum to 1, columns to T/E; ``C = softmax(z)`` or the logits, ``ssr_cost``) and
    routes by the top-k of each plan row with gates = the plan renormalised over them.
    Otherwise (and always in evaluation) softmax top-k, in training with optional
    Gaussian noise of std ``noise_std`` on the logits. ``sinkhorn_grad``: ``unrolled``
    backpropagates through the iterations, ``detach`` treats the plan as constant.
    ``ssr_draw``: ``forward`` draws per forward and layer, ``step`` once per optimizer
    step. ``xi = 0.05`` with the softmax cost follows a public reimplementation; with
    logits a larger xi (0.5-1) is advisable.
    """
    gate_mode = softmax_gate_mode(normalization, spec.top_k)
    selector = SelectiveSinkhornSelector(
        spec.num_experts,
        spec.top_k,
        p_sel=p_sel,
        xi=xi,
        cost=ssr_cost,
        noise_std=noise_std,
        sinkhorn_grad=sinkhorn_grad,
        draw=ssr_draw,
        renorm_topk=gate_mode == "renorm",
        tol=sinkhorn_tol,
        max_iter=sinkhorn_iters,
        seed=seed,
    )
    return assemble_router(spec, common, selector=selector, gate_mode="none")
