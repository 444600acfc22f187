"""Soft MoE (Puigcerver et al. 2023): slots as soft combinations of tokens.

Soft MoE routing (Puigcerver, Riquelme, Mustafa & Houlsby 2023, "From Sparse to Soft
Mixtures of Experts", arXiv 2308.00951, ICLR 2024).

Every expert has ``p`` slots; slot ``s`` has a learnable parameter ``phi_s`` (``[D]``).
Within each sequence, with slot logits ``L_ts = x_t . phi_s``:

* dispatch: ``D = softmax over the sequence's tokens`` of every column of ``L``; slot
  ``s`` receives ``x~_s = sum_t D_ts x_t`` (a soft combination of tokens);
* combine: ``C = softmax over slots`` of every row of ``L``; token ``t`` receives
  ``y_t = sum_s C_ts f_{expert(s)}(x~_s)``.

Nothing is discrete, no token is dropped, no balance loss is needed. Following the
paper's normalisation for large widths, ``x`` and ``phi`` are l2-normalised over ``D``
and the logits multiplied by a learnable scalar (``normalize=True``, scale initialised
at 1 [recon]).

The execution lives in ``routelab.SoftMoE`` (``routelab.moe_layer(..., router="soft-moe")``
builds one; ``routelab.MoE`` refuses a soft router). ``SoftRouter`` computes the slot logits and an honest ``Routing`` for
statistics and traces: every token is connected to every expert, ``topk_idx`` lists all
``E`` experts and ``topk_weight`` is the token's *combine mass* per expert
(``sum_{s in slots(e)} C_ts``, summing to 1); ``logits`` are the per-expert
``logsumexp`` of the slot logits, so ``softmax(logits)`` is that combine mass.

Dispatch mixes the tokens of a sequence (non-causal): like expert choice it leaks the
future in autoregressive decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from routelab.core.context import TokenBatch
from routelab.core.errors import ConfigError
from routelab.core.routing import Routing
from routelab.core.routing_stats import routing_stats
from routelab.core.validation import check_positive_int
from routelab.routers.parts.gates import GateNorm
from routelab.routers.parts.layout import to_padded
from routelab.routers.parts.router import Router, RoutingDraft, Scorer, Selector
from routelab.routers.parts.score_functions import Softmax
from routelab.routers.parts.scorers import apply_input_jitter
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset


class SlotScorer(Scorer):
    """Slot logits ``[T, E*p]`` and their per-expert ``logsumexp`` ``[T, E]``.

    Args:
        d_model, num_experts, slots_per_expert: shapes (``phi`` is ``[D, E*p]``).
        normalize: l2-normalise ``x`` and ``phi`` over ``D`` and scale by a learnable scalar.
        jitter_eps: Switch-style input jitter in training (0 = off).
    """

    def __init__(self, d_model: int, num_experts: int, slots_per_expert: int, *, normalize: bool, jitter_eps: float = 0.0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.slots_per_expert = check_positive_int("slots_per_expert", slots_per_expert)
        self.phi = nn.Parameter(torch.randn(d_model, num_experts * self.slots_per_expert) / math.sqrt(d_model))
        self.normalize = bool(normalize)
        self.scale = nn.Parameter(torch.ones(())) if self.normalize else None
        self.jitter_eps = float(jitter_eps)

    @property
    def num_slots(self) -> int:
        return self.num_experts * self.slots_per_expert

    def slot_logits(self, x_TD: torch.Tensor, training: bool = False) -> torch.Tensor:
        x_TD = apply_input_jitter(x_TD, self.jitter_eps, training)
        phi_DN = self.phi.float()
        if self.normalize:
            assert self.scale is not None
            x_TD = torch.nn.functional.normalize(x_TD, dim=-1)
            phi_DN = torch.nn.functional.normalize(phi_DN, dim=0)
            return self.scale.float() * (x_TD @ phi_DN)
        return x_TD @ phi_DN

    def expert_logits(self, slot_logits_TN: torch.Tensor) -> torch.Tensor:
        return slot_logits_TN.view(-1, self.num_experts, self.slots_per_expert).logsumexp(dim=-1)

    def forward(self, x_TD: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        slot_logits_TN = self.slot_logits(x_TD, draft.training)
        draft.extras["slot_logits_TN"] = slot_logits_TN
        return self.expert_logits(slot_logits_TN)


class AllExperts(Selector):
    """Every token is connected to every expert; gates are the scores (combine mass)."""

    def forward(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        assert draft.scores_TE is not None
        num_tokens, num_experts = draft.scores_TE.shape
        idx_TK = torch.arange(num_experts, device=draft.scores_TE.device).expand(num_tokens, num_experts).clone()
        return idx_TK, draft.scores_TE


@dataclass
class SoftRouting:
    """What a Soft MoE layer needs from its router: the ``Routing`` and the slot logits."""

    routing: Routing
    slot_logits_TN: torch.Tensor


def soft_dispatch_weights(slot_logits_TN: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """``[B, S, N]`` dispatch weights: per sequence and slot, a softmax over the real tokens.

    Padding positions get 0; a sequence without real tokens gets all zeros.
    """
    dispatch_BSN = torch.softmax(to_padded(slot_logits_TN, batch, fill=float("-inf")), dim=1)
    return torch.nan_to_num(dispatch_BSN, nan=0.0)


class SoftRouter(Router):
    """The router of a Soft MoE layer (see module docstring); ``forward`` returns the ``Routing``."""

    layer_kind = "soft"

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        top_k: int = 1,
        slots_per_expert: int,
        normalize: bool,
        jitter_eps: float = 0.0,
    ) -> None:
        # top_k is nominal (kept for the registry and layer attributes): every expert is used.
        super().__init__(
            num_experts=num_experts,
            top_k=top_k,
            scorer=SlotScorer(d_model, num_experts, slots_per_expert, normalize=normalize, jitter_eps=jitter_eps),
            score_fn=Softmax(),
            selector=AllExperts(),
            gate_norm=GateNorm("none"),
        )

    @property
    def slots_per_expert(self) -> int:
        return self.scorer.slots_per_expert

    def route_slots(self, x_TD: torch.Tensor, batch: TokenBatch | None = None) -> SoftRouting:
        """The ``Routing`` (combine mass per expert) and the slot logits, computed once."""
        if batch is None:
            batch = TokenBatch.single_sequence(x_TD.shape[0], device=x_TD.device)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            draft = RoutingDraft(x_TD=x_TD.float(), batch=batch, num_experts=self.num_experts, top_k=self.top_k, training=self.training)
            draft.logits_TE = self.scorer(draft.x_TD, draft)
            draft.scores_TE = self.score_fn(draft.logits_TE, draft)
            draft.selection_scores_TE = draft.scores_TE
            topk_idx_TK, gate_TK = self.selector(draft)
            gate_TK = self.gate_norm(gate_TK, topk_idx_TK, draft)
            stats = routing_stats(topk_idx_TK, self.num_experts)
        routing = Routing(
            topk_idx=topk_idx_TK,
            topk_weight=gate_TK,
            logits=draft.logits_TE,
            scores=draft.scores_TE,
            num_experts=self.num_experts,
            losses={},
            aux_loss=x_TD.new_zeros((), dtype=torch.float32),
            stats=stats,
            capacity=None,
        )
        return SoftRouting(routing, draft.extras["slot_logits_TN"])

    def forward(self, x_TD: torch.Tensor, batch: TokenBatch | None = None) -> Routing:
        return self.route_slots(x_TD, batch).routing


@register_preset(
    "soft-moe",
    description="no discrete routing: each expert's slots are softmax-over-tokens mixtures of the sequence, each "
    "token a softmax-over-slots mix of slot outputs; runs in routelab.SoftMoE (or routelab.moe_layer)",
    paper="Puigcerver, Riquelme, Mustafa & Houlsby 2023, From Sparse to Soft Mixtures of Experts (arXiv 2308.00951)",
    default_top_k=1,
    layer_kind="soft",
    exemptions={
        "capacity_factor": "no discrete assignment to drop: every expert processes exactly slots_per_expert slots "
        "per sequence, fixed by construction",
    },
)
def build_soft_moe(spec: RouterSpec, common: CommonOptions, *, slots_per_expert: int = 1, normalize: bool = True) -> SoftRouter:
    """Soft MoE router: slot parameters ``Phi`` (``[D, E * slots_per_expert]``); per
    sequence, dispatch = softmax over tokens of ``x Phi``, combine = softmax over slots.
    ``normalize`` l2-normalises ``x`` and ``Phi`` and learns a logit scale (the paper's
    recipe for large widths). The ``Routing`` it returns connects every token to every
    expert with weight = its combine mass on that expert (summing to 1); ``top_k`` is
    ignored (every expert is used). No balance loss (balanced by construction);
    ``capacity_factor`` and balance/z losses are refused. Run it with
    ``routelab.SoftMoE(..., router="soft-moe")`` (or ``routelab.moe_layer``, which picks the
    layer for any router); ``routelab.MoE`` refuses it.
    """
    refused = {
        "capacity_factor": common.capacity_factor,
        "aux_loss_coef": common.aux_loss_coef,
        "seq_aux_loss_coef": common.seq_aux_loss_coef,
        "z_loss_coef": common.z_loss_coef,
    }
    given = [name for name, value in refused.items() if value]
    if given:
        raise ConfigError(
            f"soft-moe does not support {', '.join(given)}: every expert gets exactly slots_per_expert slots per "
            "sequence, so there is nothing to drop or balance."
        )
    return SoftRouter(
        spec.d_model,
        spec.num_experts,
        top_k=spec.top_k,
        slots_per_expert=slots_per_expert,
        normalize=normalize,
        jitter_eps=common.jitter_eps,
    )
