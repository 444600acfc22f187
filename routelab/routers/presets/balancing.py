"""BIP-based balancing preset (spec §5)."""

from __future__ import annotations

from routelab.routers.base import Router
from routelab.routers.bip import BIPBalancer
from routelab.routers.presets.common import assemble_router, softmax_gate_mode
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset


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
    """BIP balancing [recon, see ``routelab.routers.bip``]. Per training batch, ``bip_iterations``
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
