"""ProMoE prototypical routing with the routing contrastive loss (Wei et al. 2025).

Prototypical routing with the routing contrastive loss (ProMoE: Wei et al. 2025,
"Routing Matters in MoE: Scaling Diffusion Transformers with Explicit Routing Guidance",
arXiv 2510.24711, ICLR 2026).

Reconstructed from the paper's description and from public reimplementations of its
router (``SparseMoeBlock.compute_router`` / ``compute_routing_contrastive_loss``):

* every expert has a learnable prototype ``c_e`` (``N(0, 0.02^2)`` init); the router
  score is the cosine similarity ``cos(x, c_e)``; gate values are that cosine as is
  (``identity``, the setting of the released configs), its softmax over experts or its
  sigmoid; top-k without renormalisation;
* routing contrastive loss (RCL): for every expert that received tokens, the mean
  ``m_e`` of its tokens' hidden states; logits ``cos(c_e, m_f) / tau`` over the active
  experts; cross-entropy with target ``e`` (each prototype should be closest to the mean
  of its own tokens and far from the others': intra-expert coherence, inter-expert
  diversity). Tokens count for every expert they were routed to (``use_top_k``) or only
  for their first one. Fewer than two active experts give 0. tau = 0.07, weight 1.

ProMoE's first routing step (unconditional image tokens of classifier-free guidance to a
dedicated expert) needs class labels and has no analogue in token routing for LMs: it is
not reproduced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from routelab.core.errors import ConfigError
from routelab.core.validation import check_choice, check_non_negative
from routelab.routers.parts.assembly import assemble_router
from routelab.routers.parts.router import Router, RouterLoss, RoutingDraft, Scorer
from routelab.routers.parts.score_functions import Identity, Sigmoid, Softmax
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset

class PrototypeScorer(Scorer):
    """``logits_te = cos(x_t, c_e)`` against learnable prototypes (``[E, D]``)."""

    def __init__(self, d_model: int, num_experts: int, *, init_std: float = 0.02) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(num_experts, d_model) * (init_std if init_std > 0 else 0.02))

    def forward(self, x_TD: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        prototypes_ED = self.prototypes.float()
        draft.extras["prototypes_ED"] = prototypes_ED
        return F.normalize(x_TD, dim=-1) @ F.normalize(prototypes_ED, dim=-1).transpose(0, 1)


def cluster_means(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean hidden state of the tokens routed to each expert, and the per-expert counts."""
    valid_TK = topk_idx_TK >= 0
    token_N = torch.arange(x_TD.shape[0], device=x_TD.device).unsqueeze(1).expand_as(topk_idx_TK)[valid_TK]
    expert_N = topk_idx_TK[valid_TK]
    sums_ED = x_TD.new_zeros(num_experts, x_TD.shape[1]).index_add(0, expert_N, x_TD.index_select(0, token_N))
    counts_E = torch.bincount(expert_N, minlength=num_experts).to(x_TD.dtype)
    return sums_ED / counts_E.clamp_min(1.0).unsqueeze(1), counts_E


def routing_contrastive_loss(
    prototypes_ED: torch.Tensor, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, temperature: float
) -> torch.Tensor:
    """ProMoE's RCL (see module docstring); 0 with fewer than two active experts."""
    means_ED, counts_E = cluster_means(x_TD, topk_idx_TK, prototypes_ED.shape[0])
    active = counts_E > 0
    if int(active.sum()) < 2:
        return prototypes_ED.sum() * 0.0
    logits_EE = F.normalize(prototypes_ED[active], dim=-1) @ F.normalize(means_ED[active], dim=-1).transpose(0, 1)
    targets = torch.arange(logits_EE.shape[0], device=logits_EE.device)
    return F.cross_entropy(logits_EE / temperature, targets)


class RoutingContrastiveLoss(RouterLoss):
    """ProMoE's routing contrastive loss on the prototypes the scorer used.

    Args:
        coef: weight (1.0 in the released configs).
        temperature: ``tau`` (0.07).
        use_top_k: a token counts for all its experts (True) or only its first slot.
    """

    def __init__(self, coef: float, *, temperature: float, use_top_k: bool, name: str = "rcl") -> None:
        super().__init__(name, coef)
        if not temperature > 0:
            raise ConfigError(f"rcl_temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)
        self.use_top_k = bool(use_top_k)

    def forward(self, draft: RoutingDraft) -> torch.Tensor:
        assert draft.topk_idx_TK is not None
        idx_TK = draft.topk_idx_TK if self.use_top_k else draft.topk_idx_TK[:, :1]
        return routing_contrastive_loss(draft.extras["prototypes_ED"], draft.x_TD, idx_TK, self.temperature)


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
    of its router; see ``routelab.routers.families.prototypes``): score ``cos(x, c_e)`` against
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
