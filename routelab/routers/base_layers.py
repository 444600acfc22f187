"""BASE layers: balanced assignment of tokens to experts (spec §3).

Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse Models" (arXiv
2103.16716; fairseq ``modules/base_layer.py``). Each expert has a centroid ``c_e``
(orthogonal init, gain 0.1) and the token-expert affinity is ``a_te = x_t . c_e``.

* Training: tokens are assigned by a balanced linear assignment on the affinities
  (computed without gradient) so that every expert receives exactly ``T*k/E`` tokens
  (``routelab.routers.balanced_assignment``).
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

import torch
from torch import nn

from routelab.core.validation import check_choice, check_positive_int, check_top_k
from routelab.routers.balanced_assignment import AUCTION_INITS, SOLVERS, balanced_assignment
from routelab.routers.base import RoutingDraft, Scorer, Selector, StatefulPart


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
        solver: str = "auction",
        auction_eps: float = 0.02,
        auction_max_rounds: int = 200,
        auction_init: str = "sinkhorn",
        warm_start: bool = False,
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
