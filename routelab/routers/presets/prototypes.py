"""ProMoE prototypical routing with the routing contrastive loss (Wei et al. 2025)."""

from __future__ import annotations

from routelab.core.errors import ConfigError
from routelab.core.validation import check_choice, check_non_negative
from routelab.routers.base import Router
from routelab.routers.presets.common import assemble_router
from routelab.routers.prototypes import PrototypeScorer, RoutingContrastiveLoss
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset
from routelab.routers.score_functions import Identity, Sigmoid, Softmax

GATE_MODES = {"identity": Identity, "softmax": Softmax, "sigmoid": Sigmoid}


@register_preset(
    "promoe",
    description="cosine similarity to learnable expert prototypes, top-1, gate = cosine; routing contrastive loss "
    "(prototype vs mean of its tokens, tau 0.07, weight 1)",
    paper="Wei et al. 2025, Routing Matters in MoE: Scaling Diffusion Transformers with Explicit Routing Guidance "
    "(ProMoE, arXiv 2510.24711, ICLR 2026)",
    default_top_k=1,
    exemptions={"weights_sum_to_one": "gates are the raw cosine similarities (promoe_gate='identity'), not renormalised"},
)
def build_promoe(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    promoe_gate: str = "identity",
    rcl_coef: float = 1.0,
    rcl_temperature: float = 0.07,
    rcl_use_top_k: bool = True,
) -> Router:
    """ProMoE prototypical routing (reconstructed from the paper and public reimplementations
    of its router; see ``routelab.routers.prototypes``): score ``cos(x, c_e)`` against
    learnable prototypes; top-k (1 in the released configs); gate = the cosine itself
    (``promoe_gate='identity'``), or its softmax / sigmoid; no renormalisation. Routing
    contrastive loss ``rcl_coef * CE(cos(c_e, mean of e's tokens) / rcl_temperature)``
    over the active experts. The conditional/unconditional split of ProMoE's first step
    (classifier-free-guidance tokens) is not reproduced. Balance losses need
    ``promoe_gate='softmax'`` (their P_e must be probabilities).
    """
    check_choice("promoe_gate", promoe_gate, tuple(GATE_MODES))
    if promoe_gate != "softmax" and (common.aux_loss_coef or common.seq_aux_loss_coef):
        raise ConfigError(
            f"aux_loss_coef/seq_aux_loss_coef need router probabilities; promoe_gate={promoe_gate!r} gives cosine "
            "scores. Use promoe_gate='softmax' with a balance loss."
        )
    contrastive_loss = RoutingContrastiveLoss(
        check_non_negative("rcl_coef", rcl_coef), temperature=rcl_temperature, use_top_k=rcl_use_top_k
    )
    return assemble_router(
        spec,
        common,
        scorer=PrototypeScorer(spec.d_model, spec.num_experts, init_std=common.router_init_std),
        score_fn=GATE_MODES[promoe_gate](),
        gate_mode="none",
        extra_losses=[contrastive_loss],
    )
