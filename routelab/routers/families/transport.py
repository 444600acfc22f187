"""Optimal-transport presets: BASE layers, Megatron Sinkhorn, Selective Sinkhorn Routing.

Sinkhorn-based selectors: Megatron's Sinkhorn router and Selective Sinkhorn Routing.

* ``MegatronSinkhornSelector`` (Megatron-Core ``moe_utils.sinkhorn`` /
  ``router.sinkhorn_load_balancing``, used by BlackMamba, Anthony et al. 2024, arXiv
  2402.01771): in training, the experts of each token are the top-k of the row of the
  Sinkhorn plan of ``exp(z)`` (rows sum to 1/T, columns to 1/E), computed without
  gradient. The gates come from the logits, not from the plan: ``sigmoid(z)`` for k=1,
  ``softmax(z)`` for k>1, at the selected experts, not renormalised. In evaluation the
  selection is the plain top-k of those activated logits.
* ``SelectiveSinkhornSelector`` (Nguyen et al. 2025, "Selective Sinkhorn Routing for
  Improved Sparse Mixture of Experts", arXiv 2511.08972): the transport problem
  ``max <Pi, C> - xi <Pi, log Pi>`` with rows summing to 1 and columns to ``T/E``, cost
  ``C`` = the logits or ``softmax(z)``. The gates come from the plan: the top-k of each
  row, renormalised. It is used only on a fraction ``p_sel`` of the training forwards;
  the others (and evaluation) use standard softmax top-k, in training optionally with
  non-learned Gaussian noise on the logits. No auxiliary loss.

Because the plan couples all tokens of the batch, training-mode routing of a token
depends on the other tokens (a property of the methods, not of this implementation).

BASE layers: balanced assignment of tokens to experts.

Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse Models" (arXiv
2103.16716; fairseq ``modules/base_layer.py``). Each expert has a centroid ``c_e``
(orthogonal init, gain 0.1) and the token-expert affinity is ``a_te = x_t . c_e``.

* Training: tokens are assigned by a balanced linear assignment on the affinities
  (computed without gradient) so that every expert receives exactly ``T*k/E`` tokens
  (``routelab.routers.parts.balanced_assignment``).
* Evaluation: greedy top-k of the affinities (top-1 in the paper).
* Gate: ``sigmoid(a_te)`` for the assigned expert; the router's gradient flows only
  through this gate. BASE's sub-layer computes ``x + sigmoid(x . c_e) * FFN_e(x)``; in
  routelab the MoE layer returns ``sigmoid(a_te) * FFN_e(x)`` and the model adds the
  residual. BASE's extra residual + LayerNorm inside each expert is not reproduced (the
  experts are the MoE layer's plain FFNs).

The fairseq implementation shuffles tokens randomly across data-parallel workers before
assignment; on a single worker that shuffle does not change the assignment and is not
done. ``top_k > 1`` (not in the paper) gives each token ``k`` distinct experts with every
expert holding exactly ``T*k/E`` tokens.

The auction starts from prices estimated by an entropic relaxation of the batch's own
problem. It can instead be warm-started from the prices of the previous optimizer step
(``warm_start=True``; buffer ``prices``, updated in ``end_of_step``). The assignment is
eps-optimal either way; on random batches the previous step's prices did not shorten the
bidding (bench/transport_routers.py), so the warm start is off by default.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from routelab.core.errors import ConfigError
from routelab.core.validation import (
    check_choice,
    check_non_negative,
    check_positive_int,
    check_probability,
    check_top_k,
)
from routelab.routers.parts.assembly import assemble_router, softmax_gate_mode
from routelab.routers.parts.balanced_assignment import AUCTION_INITS, SOLVERS, balanced_assignment
from routelab.routers.parts.randomness import RandomSource
from routelab.routers.parts.router import Router, RoutingDraft, Scorer, Selector, StatefulPart
from routelab.routers.parts.score_functions import Sigmoid, Softmax
from routelab.routers.parts.sinkhorn import check_sinkhorn_options, sinkhorn_potentials
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset

SSR_COSTS = ("softmax", "logits")
SINKHORN_GRADS = ("detach", "unrolled")
SSR_DRAWS = ("forward", "step")


def _sinkhorn_stats(draft: RoutingDraft, iterations: int, converged: bool) -> None:
    device = draft.x_TD.device
    draft.extra_stats["sinkhorn_iterations"] = torch.tensor(float(iterations), device=device)
    draft.extra_stats["sinkhorn_converged"] = torch.tensor(float(converged), device=device)


class MegatronSinkhornSelector(Selector):
    """Top-k of the Sinkhorn plan of ``exp(z)`` in training; gates from the activated logits."""

    def __init__(self, num_experts: int, top_k: int, *, tol: float, max_iter: int) -> None:
        super().__init__()
        self.top_k = check_top_k(top_k, num_experts)
        check_sinkhorn_options(tol, max_iter)
        self.tol, self.max_iter = float(tol), max_iter

    def forward(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        assert draft.logits_TE is not None and draft.scores_TE is not None
        num_tokens, num_experts = draft.logits_TE.shape
        if draft.training and num_tokens:
            with torch.no_grad():
                pot = sinkhorn_potentials(
                    draft.logits_TE.detach(),
                    row_mass=1.0 / num_tokens,
                    col_mass=1.0 / num_experts,
                    tol=self.tol,
                    max_iter=self.max_iter,
                )
                # the row potential is constant along a row, so it does not change the row's top-k
                rank_TE = draft.logits_TE.detach() + pot.g_E.unsqueeze(0)
                topk_idx_TK = torch.topk(rank_TE, self.top_k, dim=-1).indices
            _sinkhorn_stats(draft, pot.iterations, pot.converged)
        else:
            topk_idx_TK = torch.topk(draft.selection_scores_TE, self.top_k, dim=-1).indices
        return topk_idx_TK, draft.scores_TE.gather(1, topk_idx_TK)


class SelectiveSinkhornSelector(Selector, StatefulPart):
    """Selective Sinkhorn Routing: transport-map gates on a random fraction of training forwards.

    Args:
        num_experts, top_k: shape.
        p_sel: probability that a training forward is routed by Sinkhorn.
        xi: entropic regularisation of the transport problem.
        cost: ``softmax`` (the paper's "S" variant) or ``logits``.
        noise_std: std of the Gaussian noise added to the logits of the non-Sinkhorn
            training forwards (0 = none).
        sinkhorn_grad: ``unrolled`` (differentiate through the iterations) or ``detach``
            (the plan is a constant: the router gets no gradient on Sinkhorn forwards).
        draw: ``forward`` (a fresh draw at every training forward, per layer) or ``step``
            (one draw per optimizer step, made in ``end_of_step``; layers built with the
            same ``seed`` then agree).
        renorm_topk: renormalise the softmax gates of non-Sinkhorn forwards (False keeps
            the raw probabilities; top-1 is never renormalised, it would freeze the gate).
        tol, max_iter: Sinkhorn tolerance and iteration cap.
        seed: private generator seed (None = torch's global generator).
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        *,
        p_sel: float,
        xi: float,
        cost: str,
        noise_std: float,
        sinkhorn_grad: str,
        draw: str,
        renorm_topk: bool = True,
        tol: float,
        max_iter: int,
        seed: int | None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = check_top_k(top_k, num_experts)
        self.p_sel = check_probability("p_sel", p_sel)
        xi = float(xi)
        if not xi > 0 or math.isinf(xi):
            raise ConfigError(f"xi must be a finite number > 0 (the entropic regularisation), got {xi}.")
        self.xi = xi
        self.cost = check_choice("ssr_cost", cost, SSR_COSTS)
        self.noise_std = check_non_negative("noise_std", noise_std)
        self.sinkhorn_grad = check_choice("sinkhorn_grad", sinkhorn_grad, SINKHORN_GRADS)
        self.draw = check_choice("ssr_draw", draw, SSR_DRAWS)
        self.renorm_topk = bool(renorm_topk) and top_k > 1
        check_sinkhorn_options(tol, max_iter)
        self.tol, self.max_iter = float(tol), max_iter
        self.random = RandomSource(seed)
        initial = self.random.uniform() < self.p_sel if draw == "step" else False
        self.register_buffer("sinkhorn_this_step", torch.tensor(initial))

    def extra_repr(self) -> str:
        return f"p_sel={self.p_sel}, xi={self.xi}, cost={self.cost!r}, sinkhorn_grad={self.sinkhorn_grad!r}"

    def use_sinkhorn(self, draft: RoutingDraft) -> bool:
        if not draft.training or draft.num_tokens == 0 or self.p_sel == 0.0:
            return False
        if self.draw == "step":
            return bool(self.sinkhorn_this_step)
        return self.random.uniform() < self.p_sel

    def forward(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        use = self.use_sinkhorn(draft)
        draft.extra_stats["ssr_sinkhorn"] = torch.tensor(float(use), device=draft.x_TD.device)
        if use:
            return self._sinkhorn_route(draft)
        return self._softmax_route(draft)

    def _softmax_route(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        assert draft.logits_TE is not None and draft.scores_TE is not None
        if draft.training and self.noise_std > 0:
            noisy_TE = draft.logits_TE + self.noise_std * self.random.normal_like(draft.logits_TE)
            probs_TE = torch.softmax(noisy_TE, dim=-1)
            rank_TE = probs_TE
        else:
            probs_TE = draft.scores_TE
            rank_TE = draft.selection_scores_TE
        topk_idx_TK = torch.topk(rank_TE, self.top_k, dim=-1).indices
        gate_TK = probs_TE.gather(1, topk_idx_TK)
        if self.renorm_topk:
            gate_TK = gate_TK / gate_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return topk_idx_TK, gate_TK

    def _sinkhorn_route(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        assert draft.logits_TE is not None and draft.scores_TE is not None
        num_tokens, num_experts = draft.logits_TE.shape
        cost_TE = draft.scores_TE if self.cost == "softmax" else draft.logits_TE
        if self.sinkhorn_grad == "detach":
            cost_TE = cost_TE.detach()
        log_kernel_TE = cost_TE / self.xi
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.sinkhorn_grad == "unrolled"):
            pot = sinkhorn_potentials(
                log_kernel_TE,
                row_mass=1.0,
                col_mass=num_tokens / num_experts,
                tol=self.tol,
                max_iter=self.max_iter,
            )
            # row t of the plan is exp(f_t) * exp(L_t + g): renormalised over the top-k the
            # factor exp(f_t) cancels, so the gates are a softmax of L + g over the selection
            row_TE = log_kernel_TE + pot.g_E.unsqueeze(0)
            top_val_TK, topk_idx_TK = torch.topk(row_TE, self.top_k, dim=-1)
            gate_TK = torch.softmax(top_val_TK, dim=-1)
        _sinkhorn_stats(draft, pot.iterations, pot.converged)
        return topk_idx_TK, gate_TK

    @torch.no_grad()
    def end_of_step(self) -> None:
        if self.draw == "step":
            self.sinkhorn_this_step.fill_(self.random.uniform() < self.p_sel)


class CentroidAffinityScorer(Scorer):
    """``a = x C^T`` against learned expert centroids (orthogonal init with gain ``init_gain``)."""

    def __init__(self, d_model: int, num_experts: int, *, init_gain: float = 0.1) -> None:
        super().__init__()
        centroids = torch.empty(num_experts, d_model)
        nn.init.orthogonal_(centroids, gain=init_gain)
        self.centroids = nn.Parameter(centroids)

    def forward(self, x_TD: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        return x_TD @ self.centroids.float().t()


class BalancedAssignmentSelector(Selector, StatefulPart):
    """Exactly balanced assignment in training, greedy top-k in evaluation.

    Args:
        num_experts, top_k: shape of the assignment.
        solver: ``auction`` or ``hungarian`` (exact, top-1 only, O(T^3)).
        auction_eps: final auction eps as a fraction of the affinity range (1/50 in fairseq).
        auction_max_rounds: rounds before the auction's approximate finish.
        auction_init: cold-start prices: ``sinkhorn`` (entropic relaxation) or ``zero``
            (eps-scaling from zero prices).
        warm_start: start the auction from the previous step's prices (off by default).
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        *,
        solver: str,
        auction_eps: float,
        auction_max_rounds: int,
        auction_init: str,
        warm_start: bool,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = check_top_k(top_k, num_experts)
        self.solver = check_choice("base_solver", solver, SOLVERS)
        if self.solver == "hungarian" and top_k != 1:
            from routelab.core.errors import ConfigError

            raise ConfigError(f"base_solver='hungarian' needs top_k=1 (got {top_k}); use base_solver='auction'.")
        auction_eps = float(auction_eps)
        if not 0 < auction_eps <= 1:
            from routelab.core.errors import ConfigError

            raise ConfigError(f"auction_eps must lie in (0, 1] (a fraction of the affinity range), got {auction_eps}.")
        self.auction_eps = auction_eps
        self.auction_max_rounds = check_positive_int("auction_max_rounds", auction_max_rounds)
        self.auction_init = check_choice("auction_init", auction_init, AUCTION_INITS)
        self.warm_start = bool(warm_start)
        self.register_buffer("prices", torch.zeros(num_experts))
        self.register_buffer("has_prices", torch.zeros((), dtype=torch.bool))
        self.register_buffer("pending_prices", torch.zeros(num_experts), persistent=False)
        self.register_buffer("has_pending", torch.zeros((), dtype=torch.bool), persistent=False)

    def forward(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        assert draft.logits_TE is not None and draft.scores_TE is not None
        affinity_TE = draft.logits_TE.detach()
        if draft.training:
            init = self.prices if (self.warm_start and bool(self.has_prices)) else None
            result = balanced_assignment(
                affinity_TE,
                self.top_k,
                solver=self.solver,
                eps_rel=self.auction_eps,
                max_rounds=self.auction_max_rounds,
                init_prices_E=init,
                init=self.auction_init,
            )
            topk_idx_TK = result.topk_idx_TK
            if self.solver == "auction" and self.warm_start and draft.num_tokens:
                with torch.no_grad():
                    self.pending_prices.copy_(result.prices_E - result.prices_E.min())
                    self.has_pending.fill_(True)
            draft.extra_stats["base_auction_rounds"] = torch.tensor(float(result.rounds), device=affinity_TE.device)
        else:
            topk_idx_TK = torch.topk(affinity_TE, self.top_k, dim=-1).indices
        return topk_idx_TK, draft.scores_TE.gather(1, topk_idx_TK)

    @torch.no_grad()
    def end_of_step(self) -> None:
        if bool(self.has_pending):
            self.prices.copy_(self.pending_prices)
            self.has_prices.fill_(True)
            self.has_pending.fill_(False)


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
