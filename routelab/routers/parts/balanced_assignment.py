"""Balanced token-to-expert assignment: every expert receives exactly ``T*k/E`` tokens.

The problem of BASE layers (Lewis et al. 2021, "BASE Layers: Simplifying Training of Large,
Sparse Models", arXiv 2103.16716):

    max  sum_te a_te x_te   s.t.  sum_e x_te = k,  sum_t x_te = cap_e,  x_te in {0, 1},

with ``cap_e = floor(T*k/E)`` plus one for the first ``(T*k) mod E`` experts (so the loads
differ by at most one when ``E`` does not divide ``T*k``; exactly ``T*k/E`` otherwise).

Solvers:

* ``auction`` (default): a vectorised Jacobi auction (Bertsekas 1979/1992). Tokens bid for
  expert slots; an expert keeps its ``cap_e`` highest bids and its price is the lowest
  bid it holds. A token that needs ``m`` more experts bids on its ``m`` best experts (by
  value minus price) at ``a_te - v_(m+1) + eps``, where ``v_(m+1)`` is its next-best
  value, so every held assignment stays within ``eps`` of the token's best alternative
  (eps-complementary slackness). The result is always exactly balanced and within
  ``T*k*eps`` of the optimum. ``eps`` shrinks geometrically from a quarter of the value
  range down to ``eps_rel`` times the range (eps-scaling), keeping the prices between
  phases. Initial prices may be given (e.g. the previous step's) or estimated from an
  entropic relaxation (Sinkhorn, the default ``init``); the solver then runs a single
  phase at the final ``eps`` and needs several times fewer rounds. After ``max_rounds`` rounds ``eps`` doubles every
  round (an approximate finish that terminates quickly, like the approximate rounds of
  the fairseq implementation) and no further eps phase is started; ``rounds`` reports how
  long it took.
* ``hungarian``: ``scipy.optimize.linear_sum_assignment`` on the token x expert-slot
  matrix; exact, ``O(T^3)``, ``k = 1`` only; for tests and small batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from routelab.core.errors import ConfigError

SOLVERS = ("auction", "hungarian")
AUCTION_INITS = ("sinkhorn", "zero")


@dataclass
class Assignment:
    """A balanced assignment.

    Attributes:
        topk_idx_TK: int64 ``[T, k]`` distinct experts of every token.
        prices_E: final expert prices (auction) or zeros (hungarian).
        rounds: bidding rounds run (0 for hungarian).
    """

    topk_idx_TK: torch.Tensor
    prices_E: torch.Tensor
    rounds: int


def balanced_capacities(num_tokens: int, top_k: int, num_experts: int, device: torch.device) -> torch.Tensor:
    """``cap_e``: ``floor(T*k/E)``, plus one for the first ``(T*k) mod E`` experts."""
    total = num_tokens * top_k
    cap_E = torch.full((num_experts,), total // num_experts, dtype=torch.long, device=device)
    cap_E[: total % num_experts] += 1
    return cap_E


def hungarian_assignment(values_TE: torch.Tensor) -> Assignment:
    """Exact balanced top-1 assignment with scipy's linear_sum_assignment."""
    from scipy.optimize import linear_sum_assignment

    num_tokens, num_experts = values_TE.shape
    cap_E = balanced_capacities(num_tokens, 1, num_experts, torch.device("cpu"))
    slot_expert = np.repeat(np.arange(num_experts), cap_E.numpy())
    values = values_TE.detach().double().cpu().numpy()
    rows, cols = linear_sum_assignment(values[:, slot_expert], maximize=True)
    expert_T = np.empty(num_tokens, dtype=np.int64)
    expert_T[rows] = slot_expert[cols]
    idx = torch.from_numpy(expert_T).to(values_TE.device).unsqueeze(1)
    return Assignment(idx, values_TE.new_zeros(num_experts), rounds=0)


def auction_assignment(
    values_TE: torch.Tensor,
    top_k: int,
    *,
    eps_rel: float = 0.02,
    eps_min: float = 1e-4,
    scaling: float = 4.0,
    max_rounds: int = 200,
    init_prices_E: torch.Tensor | None = None,
    init: str = "sinkhorn",
) -> Assignment:
    """Balanced assignment of ``top_k`` distinct experts per token by eps-scaling auction.

    Args:
        values_TE: fp32 ``[T, E]`` benefit of each (token, expert) pair (finite).
        top_k: experts per token (``k < E``; ``k == E`` assigns every expert).
        eps_rel: final eps as a fraction of the value range (fairseq uses 1/50).
        eps_min: lower bound of the final eps (absolute).
        scaling: eps is divided by this between phases (> 1).
        max_rounds: rounds before the approximate finish (eps doubling).
        init_prices_E: warm-start prices; a single phase at the final eps is run.
        init: without ``init_prices_E``, ``sinkhorn`` starts from the prices of an entropic
            relaxation (one phase at the final eps) and ``zero`` from zero prices with
            eps-scaling.
    """
    values_TE = values_TE.detach().float()
    num_tokens, num_experts = values_TE.shape
    device = values_TE.device
    if num_tokens == 0:
        return Assignment(torch.empty(0, top_k, dtype=torch.long, device=device), values_TE.new_zeros(num_experts), 0)
    if top_k >= num_experts:
        idx = torch.arange(num_experts, device=device).expand(num_tokens, num_experts).clone()
        return Assignment(idx, values_TE.new_zeros(num_experts), 0)
    cap_E = balanced_capacities(num_tokens, top_k, num_experts, device)
    value_range = float(values_TE.max() - values_TE.min())
    eps_final = max(value_range * eps_rel, eps_min)
    if init_prices_E is not None:
        prices_E = init_prices_E.detach().to(device=device, dtype=torch.float32).clone()
        eps = eps_final
    elif init == "sinkhorn":
        prices_E = entropic_prices(values_TE, top_k, cap_E, value_range)
        eps = eps_final
    else:
        prices_E = values_TE.new_zeros(num_experts)
        eps = max(value_range / 4.0, eps_final)
    rounds = 0
    while True:
        idx_TK, bid_TK, prices_E, rounds = _auction_phase(
            values_TE, top_k, cap_E, prices_E, eps, rounds, max_rounds, max(value_range, eps_final)
        )
        if eps <= eps_final or rounds >= max_rounds:
            return Assignment(idx_TK, prices_E, rounds)
        eps = max(eps / scaling, eps_final)


def entropic_prices(values_TE: torch.Tensor, top_k: int, cap_E: torch.Tensor, value_range: float) -> torch.Tensor:
    """Approximate equilibrium prices from an entropic relaxation of the assignment.

    Sinkhorn on ``exp(a / xi)`` with rows of mass ``k`` and columns of mass ``T k / E``
    (``xi`` = 1/20 of the value range, 50 iterations at most); the column potential ``g``
    gives prices ``-xi * g``. Only a starting point: the auction's result does not depend
    on it beyond eps-optimality, it just needs far fewer rounds.
    """
    from routelab.routers.parts.sinkhorn import sinkhorn_potentials

    num_tokens, num_experts = values_TE.shape
    xi = max(value_range / 20.0, 1e-6)
    pot = sinkhorn_potentials(
        values_TE / xi, row_mass=float(top_k), col_mass=num_tokens * top_k / num_experts, tol=1e-3, max_iter=50
    )
    prices_E = -xi * pot.g_E
    return prices_E - prices_E.min()


def _auction_phase(
    values_TE: torch.Tensor,
    top_k: int,
    cap_E: torch.Tensor,
    base_prices_E: torch.Tensor,
    eps: float,
    rounds: int,
    max_rounds: int,
    max_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One eps phase from an empty assignment; empty slots of an expert cost its base price.

    Past ``max_rounds`` eps doubles every round up to ``max_eps`` (the value range), where
    every outbid moves a price by the whole range and the bidding ends within a few rounds.
    """
    num_tokens, num_experts = values_TE.shape
    device = values_TE.device
    idx_TK = torch.full((num_tokens, top_k), -1, dtype=torch.long, device=device)
    bid_TK = values_TE.new_zeros(num_tokens, top_k)
    prices_E = base_prices_E.clone()
    spare_inf = values_TE.new_full((num_experts + 1,), float("inf"))
    while True:
        empty_TK = idx_TK < 0
        need_T = empty_TK.sum(dim=1)
        bidders_N = need_T.nonzero(as_tuple=True)[0]
        if bidders_N.numel() == 0:
            return idx_TK, bid_TK, prices_E, rounds
        rounds += 1
        if rounds > max_rounds:
            eps = min(2.0 * eps, max_eps)
        held_NK = idx_TK.index_select(0, bidders_N)
        net_NE = values_TE.index_select(0, bidders_N) - prices_E
        # empty slots scatter into a spare column so they cannot collide with expert 0
        slot_col_NK = torch.where(held_NK >= 0, held_NK, torch.full_like(held_NK, num_experts))
        held_mask_NE = torch.zeros(net_NE.shape[0], num_experts + 1, dtype=torch.bool, device=device)
        held_mask_NE = held_mask_NE.scatter_(1, slot_col_NK, True)[:, :num_experts]
        net_NE = net_NE.masked_fill(held_mask_NE, float("-inf"))
        best_val_NK1, best_idx_NK1 = torch.topk(net_NE, top_k + 1, dim=1)
        need_N = need_T.index_select(0, bidders_N)
        next_best_N1 = best_val_NK1.gather(1, need_N.unsqueeze(1))
        expert_NK = best_idx_NK1[:, :top_k]
        bid_NK = values_TE.index_select(0, bidders_N).gather(1, expert_NK) - next_best_N1 + eps
        # the j-th bid of a token fills its j-th empty slot
        empty_NK = empty_TK.index_select(0, bidders_N)
        empty_rank_NK = torch.cumsum(empty_NK, dim=1) - 1
        fills_NK = empty_NK & (empty_rank_NK < need_N.unsqueeze(1))
        bid_rank_NK = empty_rank_NK.clamp(0, top_k - 1)
        rows, cols = fills_NK.nonzero(as_tuple=True)
        new_experts = expert_NK.gather(1, bid_rank_NK)[rows, cols]
        idx_TK[bidders_N[rows], cols] = new_experts
        bid_TK[bidders_N[rows], cols] = bid_NK.gather(1, bid_rank_NK)[rows, cols]
        idx_TK = _evict_lowest_bids(idx_TK, bid_TK, cap_E, new_experts)
        # empty slots land in the spare bin ``E``
        bin_N = torch.where(idx_TK >= 0, idx_TK, num_experts).reshape(-1)
        counts_E = torch.bincount(bin_N, minlength=num_experts + 1)[:num_experts]
        lowest_E = spare_inf.scatter_reduce(0, bin_N, bid_TK.reshape(-1), "amin", include_self=True)[:num_experts]
        prices_E = torch.where(counts_E >= cap_E, lowest_E, prices_E)


def _evict_lowest_bids(
    idx_TK: torch.Tensor, bid_TK: torch.Tensor, cap_E: torch.Tensor, bid_experts: torch.Tensor
) -> torch.Tensor:
    """Keep each expert's ``cap_e`` highest bids; only experts that received bids are ranked."""
    num_experts = cap_E.numel()
    received_E = torch.zeros(num_experts + 1, dtype=torch.bool, device=idx_TK.device)
    received_E[bid_experts] = True
    flat_idx = idx_TK.reshape(-1)
    candidates = received_E[torch.where(flat_idx >= 0, flat_idx, num_experts)].nonzero(as_tuple=True)[0]
    experts = flat_idx.index_select(0, candidates)
    bids = bid_TK.reshape(-1).index_select(0, candidates).double()
    # one sort by (expert ascending, bid descending): the expert id dominates the key
    span = 2.0 * float(bids.abs().max()) + 1.0
    order = torch.argsort(experts.double() * span - bids)
    sorted_experts = experts.index_select(0, order)
    counts = torch.bincount(sorted_experts, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=idx_TK.device) - starts.index_select(0, sorted_experts)
    evicted = candidates.index_select(0, order[rank >= cap_E.index_select(0, sorted_experts)])
    if evicted.numel() == 0:
        return idx_TK
    flat_idx = flat_idx.clone()
    flat_idx[evicted] = -1
    return flat_idx.view_as(idx_TK)


def balanced_assignment(
    values_TE: torch.Tensor,
    top_k: int,
    *,
    solver: str = "auction",
    eps_rel: float = 0.02,
    max_rounds: int = 200,
    init_prices_E: torch.Tensor | None = None,
    init: str = "sinkhorn",
) -> Assignment:
    """Dispatch to the ``auction`` or ``hungarian`` solver (see the module docstring)."""
    if solver == "hungarian":
        if top_k != 1:
            raise ConfigError(
                f"base_solver='hungarian' solves top-1 assignment only, got top_k={top_k}; use base_solver='auction'."
            )
        return hungarian_assignment(values_TE)
    if solver != "auction":
        raise ConfigError(f"base_solver={solver!r} must be one of {SOLVERS}.")
    return auction_assignment(
        values_TE, top_k, eps_rel=eps_rel, max_rounds=max_rounds, init_prices_E=init_prices_E, init=init
    )
