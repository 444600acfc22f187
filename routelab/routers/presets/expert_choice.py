"""The expert-choice preset (Zhou et al. 2022; spec §2)."""

from __future__ import annotations

from routelab.routers.base import Router
from routelab.routers.expert_choice import ExpertChoice
from routelab.routers.presets.common import assemble_router
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset


@register_preset(
    "expert-choice",
    description="each expert picks its top-C tokens per sequence (C = L*k*cf/E); tokens get 0..E experts",
    paper="Zhou et al. 2022, Mixture-of-Experts with Expert Choice Routing (arXiv 2202.09368)",
    default_top_k=2,
    common_defaults={"capacity_factor": 1.0},
)
def build_expert_choice(
    spec: RouterSpec, common: CommonOptions, *, ec_gate: str = "softmax", ec_grouping: str = "sequence"
) -> Router:
    """Expert choice: ``top_k`` is the average number of experts per token and
    ``capacity_factor`` scales every expert's per-sequence capacity ``floor(L*k*cf/E)``.
    ``ec_gate`` is ``softmax`` (Zhou et al.), ``post-softmax`` or ``sigmoid`` (EC-DLM);
    ``ec_grouping`` is ``sequence`` (default) or ``batch``.
    """
    selector = ExpertChoice(
        spec.num_experts,
        spec.top_k,
        capacity_factor=common.capacity_factor or 1.0,
        gate=ec_gate,
        grouping=ec_grouping,
    )
    return assemble_router(spec, common, selector=selector, gate_mode="none", capacity=None)
