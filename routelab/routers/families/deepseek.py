"""Loss-free balancing presets: DeepSeek-V3 and Wang et al. 2024."""

from __future__ import annotations

from routelab.core.validation import check_non_negative
from routelab.routers.parts.balancers import LossFreeBias
from routelab.routers.parts.router import Router
from routelab.routers.parts.assembly import assemble_router, sigmoid_gate_mode, softmax_gate_mode
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset
from routelab.routers.parts.score_functions import Sigmoid
from routelab.routers.parts.selectors import GroupLimitedTopK, TopK


def default_num_groups(num_experts: int, top_k: int) -> int:
    """8 groups (DeepSeek-V3) when ``E`` is a multiple of 8 with >= 2 experts per group, else 1."""
    if num_experts % 8 == 0 and num_experts // 8 >= 2:
        return 8
    return 1


@register_preset(
    "deepseek-v3",
    description="sigmoid scores, group-limited top-k, loss-free bias balancer, gates renormalised x2.5, seq aux loss 1e-4",
    paper="DeepSeek-AI 2024, DeepSeek-V3 Technical Report (arXiv 2412.19437)",
    default_top_k=2,
    common_defaults={"seq_aux_loss_coef": 1e-4},
)
def build_deepseek_v3(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    num_groups: int | None = None,
    group_topk: int | None = None,
    scaling_factor: float = 2.5,
    bias_update_rate: float = 1e-3,
    bias_step_rule: str = "sign",
    bias_recenter: bool = False,
    bias_clamp: float = 0.0,
    bias_counts: str = "after_drops",
) -> Router:
    """DeepSeek-V3 routing.

    ``s = sigmoid(z)``; selection = top-k of ``s + b`` within the ``group_topk`` best of
    ``num_groups`` groups (group score = sum of its top ``k // group_topk`` biased
    scores); gates = ``s`` renormalised over the selection, times ``scaling_factor``.
    ``num_groups`` defaults to 8 when ``E`` is a multiple of 8 with at least 2 experts
    per group (V3: 256 experts, 8 groups, 4 kept) and to 1 (no group limit) otherwise;
    ``group_topk`` defaults to half the groups. At ``top_k=1`` the gate is
    ``sigmoid(z) * scaling_factor`` (Megatron-Core; one renormalised gate would be constant).
    The sequence-wise balance loss counts the plain top-k of the unbiased scores, as the
    paper (eq. 17-20) and Megatron-Core do, not the biased, group-limited selection.
    With a capacity, the bias update counts the loads after drops (``bias_counts=
    "after_drops"``, Megatron-Core's ``routing_map``) or before (``"before_drops"``).
    """
    groups = default_num_groups(spec.num_experts, spec.top_k) if num_groups is None else num_groups
    kept_groups = group_topk
    if kept_groups is None:  # half the groups, or more if they would hold fewer than top_k experts
        group_size = spec.num_experts // max(groups, 1)
        kept_groups = min(groups, max(1, groups // 2, -(-spec.top_k // max(group_size, 1))))
    if groups == 1:
        selector = TopK(spec.num_experts, spec.top_k)
    else:
        selector = GroupLimitedTopK(spec.num_experts, spec.top_k, groups, kept_groups)
    return assemble_router(
        spec,
        common,
        score_fn=Sigmoid(),
        selector=selector,
        gate_mode=sigmoid_gate_mode(spec.top_k),
        scaling_factor=check_non_negative("scaling_factor", scaling_factor),
        balancer=LossFreeBias(
            spec.num_experts,
            update_rate=bias_update_rate,
            step_rule=bias_step_rule,
            recenter=bias_recenter,
            clamp=bias_clamp,
            counts=bias_counts,
        ),
        loss_counts="unbiased_topk",
    )


@register_preset(
    "loss-free",
    description="softmax top-k with a loss-free selection bias updated once per step (no aux loss)",
    paper="Wang et al. 2024, Auxiliary-Loss-Free Load Balancing Strategy for MoE (arXiv 2408.15664)",
    default_top_k=2,
)
def build_loss_free(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    normalization: str = "auto",
    bias_update_rate: float = 1e-3,
    bias_step_rule: str = "sign",
    bias_recenter: bool = False,
    bias_clamp: float = 0.0,
    bias_counts: str = "after_drops",
) -> Router:
    """Softmax top-k whose selection uses ``softmax(z) + b``; ``b`` follows the sign rule
    ``b_e += u * sign(mean(c) - c_e)`` once per optimizer step. Gates use the unbiased
    probabilities (renormalised for ``top_k > 1`` unless ``normalization`` says otherwise).
    The bias lives on the probability scale, so ``u = 1e-3`` matches the paper.
    ``bias_counts`` and the balance losses (when switched on) follow Megatron-Core, as in
    ``deepseek-v3``.
    """
    return assemble_router(
        spec,
        common,
        gate_mode=softmax_gate_mode(normalization, spec.top_k),
        balancer=LossFreeBias(
            spec.num_experts,
            update_rate=bias_update_rate,
            step_rule=bias_step_rule,
            recenter=bias_recenter,
            clamp=bias_clamp,
            counts=bias_counts,
        ),
        loss_counts="unbiased_topk",
    )
