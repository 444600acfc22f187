"""BIP-based balancing: dual prices of the routing LP as a selection bias.

"BIP-Based Balancing" (arXiv 2502.15451). Routing ``n`` tokens to ``m`` experts with ``K``
experts per token and capacity ``C = ceil(n*K/m * cf)`` is the binary integer program

    max sum_ij s_ij x_ij   s.t.  sum_j x_ij = K,  sum_i x_ij <= C,  x_ij in {0, 1},

whose LP dual is ``min K sum_i p_i + C sum_j q_j + sum_ij r_ij`` with
``p_i + q_j + r_ij >= s_ij``, ``q, r >= 0``. Block-coordinate steps on the dual
[recon: reconstructed from the abstract, reviews and LP duality; the official repository
was not available]:

    p_i <- (K+1)-th largest over j of (s_ij - q_j)
    q_j <- max(0, midpoint of the C-th and (C+1)-th largest over i of (s_ij - p_i))

repeated ``T_iter`` times from the persistent ``q`` (warm start); tokens are then routed
to ``TopK_j(s_ij - q_j)`` and gated by the unbiased ``s_ij``. Setting ``q_j`` exactly to the
(C+1)-th value leaves a token tied with the threshold; the midpoint (default) or the plain
value (``tie_rule='plain'``) are both offered.

State: ``bias = -q`` (a buffer, saved in checkpoints) is what the selection adds to the
scores. In training each forward solves from the stored ``q`` and the solution is held
as pending; ``end_of_step`` stores the mean of the micro-batches' solutions. In
evaluation the stored bias is used as it is (``eval_iterations=True`` solves on the
evaluation batch too).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from routelab.core.errors import ConfigError
from routelab.core.validation import check_capacity_factor, check_choice, check_positive_int
from routelab.routers.parts.assembly import assemble_router, softmax_gate_mode
from routelab.routers.parts.router import Balancer, Router, RoutingDraft
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset

TIE_RULES = ("midpoint", "plain")


def bip_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float = 1.0) -> int:
    """``C = ceil(n*K/m * cf)``."""
    return int(math.ceil(num_tokens * top_k / num_experts * capacity_factor))


def bip_dual_iterations(
    scores_TE: torch.Tensor,
    q_E: torch.Tensor,
    top_k: int,
    capacity: int,
    iterations: int,
    tie_rule: str = "midpoint",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``iterations`` dual steps from ``q_E``; returns ``(p_T, q_E)``."""
    num_tokens, num_experts = scores_TE.shape
    p_T = scores_TE.new_zeros(num_tokens)
    if num_tokens == 0 or top_k >= num_experts:
        return p_T, torch.zeros_like(q_E)
    if capacity >= num_tokens:  # no expert can be over capacity: the constraint is slack
        return p_T, torch.zeros_like(q_E)
    for _ in range(iterations):
        p_T = torch.topk(scores_TE - q_E, top_k + 1, dim=1).values[:, top_k]
        reduced_TE = scores_TE - p_T.unsqueeze(1)
        top_CE = torch.topk(reduced_TE, capacity + 1, dim=0).values
        threshold_E = top_CE[capacity]
        if tie_rule == "midpoint":
            threshold_E = 0.5 * (top_CE[capacity - 1] + threshold_E)
        q_E = threshold_E.clamp_min(0.0)
    return p_T, q_E


class BIPBalancer(Balancer):
    """Dual-price selection bias of the BIP routing LP.

    Args:
        num_experts, top_k: shape of the routing.
        iterations: ``T_iter`` dual steps per forward (1-4 in the paper's reviews).
        capacity_factor: ``C = ceil(n*K/m * cf)``.
        tie_rule: ``midpoint`` or ``plain``.
        eval_iterations: also solve on evaluation batches (else the stored bias is used).
        all_reduce: average the micro-batch solutions over the default process group when
            torch.distributed is initialised (data-parallel ranks must agree on the bias).
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        *,
        iterations: int,
        capacity_factor: float,
        tie_rule: str,
        eval_iterations: bool,
        all_reduce: bool = True,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.iterations = check_positive_int("bip_iterations", iterations)
        factor = check_capacity_factor(capacity_factor, "bip_capacity_factor")
        if factor is None:
            raise ConfigError("bip_capacity_factor must be a number > 0 (BIP balances against a capacity).")
        self.capacity_factor = factor
        self.tie_rule = check_choice("bip_tie_rule", tie_rule, TIE_RULES)
        self.eval_iterations = bool(eval_iterations)
        self.all_reduce = all_reduce
        self.register_buffer("bias", torch.zeros(num_experts))
        self.register_buffer("pending_q_sum", torch.zeros(num_experts), persistent=False)
        self.register_buffer("pending_count", torch.zeros(()), persistent=False)

    def solve(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """The dual prices ``q`` for this batch, warm-started from the stored ones."""
        capacity = bip_capacity(scores_TE.shape[0], self.top_k, self.num_experts, self.capacity_factor)
        with torch.no_grad():
            _, q_E = bip_dual_iterations(
                scores_TE.detach(), -self.bias, self.top_k, capacity, self.iterations, self.tie_rule
            )
        return q_E

    def selection_scores(self, scores_TE: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        if draft.training or self.eval_iterations:
            q_E = self.solve(scores_TE)
            if draft.training:
                draft.extras["bip_q_E"] = q_E
        else:
            q_E = -self.bias
        return scores_TE - q_E.to(scores_TE.dtype)

    def observe(self, draft: RoutingDraft) -> None:
        q_E = draft.extras.get("bip_q_E")
        if q_E is not None and draft.num_tokens:
            self.pending_q_sum += q_E
            self.pending_count += 1

    @torch.no_grad()
    def end_of_step(self) -> None:
        if self.all_reduce and dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.pending_q_sum)
            dist.all_reduce(self.pending_count)
        if float(self.pending_count) > 0:
            self.bias.copy_(-(self.pending_q_sum / self.pending_count))
        self.pending_q_sum.zero_()
        self.pending_count.zero_()


@register_preset(
    "bip",
    description="softmax top-k of s - q, q = dual prices of the capacity-constrained routing LP "
    "(T_iter warm-started steps per batch), gates = s",
    paper="BIP-Based Balancing for Mixture-of-Experts (arXiv 2502.15451)",
    default_top_k=2,
    exemptions={
        "weights_sum_to_one": "gates are the raw softmax probabilities of the selected experts (the paper's "
        "gate); normalization='renorm' makes them sum to 1",
    },
)
def build_bip(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    bip_iterations: int = 2,
    bip_capacity_factor: float = 1.0,
    bip_tie_rule: str = "midpoint",
    bip_eval_iterations: bool = False,
    normalization: str = "pre_softmax_norenorm",
) -> Router:
    """BIP balancing [recon, see ``routelab.routers.families.balancing``]. Per training batch, ``bip_iterations``
    block-coordinate steps on the LP dual (``p_i`` = (K+1)-th largest of ``s_i - q``;
    ``q_j`` = midpoint of the C-th and (C+1)-th largest of ``s_ij - p_i``, floored at 0;
    ``C = ceil(n K / m * bip_capacity_factor)``) start from the stored ``q``; tokens take
    the top-k of ``s - q`` and are gated by ``s``. ``end_of_step`` stores the new ``q``
    (as ``balancer.bias = -q``). Evaluation uses the stored prices unless
    ``bip_eval_iterations``. For a hard capacity add ``capacity_factor``.
    """
    return assemble_router(
        spec,
        common,
        gate_mode=softmax_gate_mode(normalization, spec.top_k),
        balancer=BIPBalancer(
            spec.num_experts,
            spec.top_k,
            iterations=bip_iterations,
            capacity_factor=bip_capacity_factor,
            tie_rule=bip_tie_rule,
            eval_iterations=bip_eval_iterations,
        ),
    )
