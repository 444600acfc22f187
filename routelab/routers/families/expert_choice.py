"""The expert-choice preset (Zhou et al. 2022).

Expert-choice selection (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Each expert picks its ``C`` highest-scoring tokens instead of each token picking experts.
Grouping is per sequence by default (EC-DLM, ``zhangshuibai/EC-DLM``): sequence ``b``
with ``L_b`` real tokens gives every expert ``C_b = min(L_b, max(1, floor(L_b*k*cf/E)))``
slots; ``grouping="batch"`` pools all tokens into one group. A token may be picked by
0..E experts; the result is returned token-major with ``-1`` in empty slots.

Gate modes:
* ``softmax`` (Zhou et al.): rank and gate by ``softmax(z)``, no renormalisation;
* ``post-softmax`` (EC-DLM default): rank by raw logit, gate = softmax over the logits of
  the experts that picked the token (a token picked once gets gate 1);
* ``sigmoid``: rank by logit, gate = ``sigmoid(z)`` normalised over the picking experts.

Selection is non-causal (an expert compares tokens across the sequence), which is fine
for encoders and diffusion LMs but leaks the future in autoregressive decoding.
"""

from __future__ import annotations

import torch

from routelab.core.validation import check_capacity_factor, check_choice, check_top_k
from routelab.routers.parts.assembly import assemble_router
from routelab.routers.parts.router import Router, RoutingDraft, Selector
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset

EC_GATES = ("softmax", "post-softmax", "sigmoid")
EC_GROUPINGS = ("sequence", "batch")


class ExpertChoice(Selector):
    """Every expert takes its top-``C`` tokens per group (sequence or batch)."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        *,
        capacity_factor: float = 1.0,
        gate: str,
        grouping: str,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = check_top_k(top_k, num_experts)
        self.capacity_factor = check_capacity_factor(capacity_factor) or 1.0
        self.gate = check_choice("ec_gate", gate, EC_GATES)
        self.grouping = check_choice("ec_grouping", grouping, EC_GROUPINGS)

    def group_capacities(self, lengths_G: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        """Slots per expert in each group: ``min(L, max(1, floor(L*k*cf/E)))`` (0 for empty groups)."""
        raw = torch.floor(lengths_G.to(torch.float64) * self.top_k * self.capacity_factor / self.num_experts)
        cap = torch.clamp(raw.long(), min=1)
        return torch.minimum(cap, lengths_G.long())

    def _groups(self, draft: RoutingDraft) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        """(num_groups, group_len, flat row of each token in [G*Lg], lengths per group)."""
        batch = draft.batch
        num_tokens = draft.num_tokens
        if self.grouping == "batch":
            rows = torch.arange(num_tokens, device=draft.x_TD.device)
            return 1, max(num_tokens, 1), rows, torch.tensor([num_tokens], device=draft.x_TD.device)
        rows = batch.seq_id_T * batch.seq_len + batch.position_T
        lengths = torch.bincount(batch.seq_id_T, minlength=batch.batch_size)
        return batch.batch_size, max(batch.seq_len, 1), rows, lengths

    def rank_scores(self, draft: RoutingDraft) -> torch.Tensor:
        assert draft.selection_scores_TE is not None and draft.logits_TE is not None
        if self.gate == "softmax":
            return draft.selection_scores_TE
        bias = draft.selection_scores_TE - draft.scores_TE  # a balancer's bias, if any
        return draft.logits_TE + bias

    def forward(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens, num_experts = draft.num_tokens, self.num_experts
        device = draft.x_TD.device
        if num_tokens == 0:
            empty = torch.empty(0, 1, dtype=torch.long, device=device)
            draft.extras["capacity"] = 0
            return empty, torch.empty(0, 1, device=device)
        rank_TE = self.rank_scores(draft)
        num_groups, group_len, rows_T, lengths_G = self._groups(draft)
        cap_G = self.group_capacities(lengths_G, draft)
        draft.extras["capacity"] = int(cap_G.sum())
        draft.extras["ec_capacity_per_group"] = cap_G
        padded = rank_TE.new_full((num_groups * group_len, num_experts), float("-inf"))
        padded[rows_T] = rank_TE
        padded_GLE = padded.view(num_groups, group_len, num_experts)
        cap_max = int(cap_G.max())
        _, pos_GCE = torch.topk(padded_GLE, cap_max, dim=1)
        token_of_row = torch.full((num_groups * group_len,), -1, dtype=torch.long, device=device)
        token_of_row[rows_T] = torch.arange(num_tokens, device=device)
        group_offset = (torch.arange(num_groups, device=device) * group_len).view(-1, 1, 1)
        token_GCE = token_of_row[pos_GCE + group_offset]
        rank_in_group = torch.arange(cap_max, device=device).view(1, -1, 1)
        picked_GCE = (rank_in_group < cap_G.view(-1, 1, 1)) & (token_GCE >= 0)
        expert_GCE = torch.arange(num_experts, device=device).view(1, 1, -1).expand_as(token_GCE)
        mask_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=device)
        mask_TE[token_GCE[picked_GCE], expert_GCE[picked_GCE]] = True

        k_max = max(int(mask_TE.sum(dim=1).max()), 1)
        key_TE = torch.where(mask_TE, rank_TE, torch.full_like(rank_TE, float("-inf")))
        _, topk_idx_TK = torch.topk(key_TE, k_max, dim=-1)
        valid_TK = mask_TE.gather(1, topk_idx_TK)
        topk_idx_TK = torch.where(valid_TK, topk_idx_TK, torch.full_like(topk_idx_TK, -1))
        gate_TK = self._gates(draft, mask_TE, topk_idx_TK)
        return topk_idx_TK, gate_TK

    def _gates(self, draft: RoutingDraft, mask_TE: torch.Tensor, topk_idx_TK: torch.Tensor) -> torch.Tensor:
        assert draft.scores_TE is not None and draft.logits_TE is not None
        idx_TK = topk_idx_TK.clamp_min(0)
        if self.gate == "softmax":
            gate_TK = draft.scores_TE.gather(1, idx_TK)
        elif self.gate == "post-softmax":
            masked_TE = draft.logits_TE.masked_fill(~mask_TE, float("-inf"))
            any_T1 = mask_TE.any(dim=1, keepdim=True)
            masked_TE = torch.where(any_T1, masked_TE, torch.zeros_like(masked_TE))
            gate_TK = torch.softmax(masked_TE, dim=-1).gather(1, idx_TK)
        else:
            sig_TE = torch.sigmoid(draft.logits_TE) * mask_TE
            gate_TK = (sig_TE / sig_TE.sum(dim=1, keepdim=True).clamp_min(1e-20)).gather(1, idx_TK)
        return torch.where(topk_idx_TK >= 0, gate_TK, torch.zeros_like(gate_TK))


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
