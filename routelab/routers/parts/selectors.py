"""Token-choice selectors: top-k and group-limited top-k.

Top-k routing as in Shazeer et al. 2017 / GShard / Switch; group-limited (node-limited)
top-k as in DeepSeek-V2/V3 (DeepSeek-AI 2024): experts are split into groups, a group's
score is the sum of its best ``k // group_topk`` selection scores, only the best
``group_topk`` groups stay eligible, then the global top-k is taken.
"""

from __future__ import annotations

import torch

from routelab.core.errors import ConfigError
from routelab.core.validation import check_positive_int, check_top_k
from routelab.routers.parts.router import RoutingDraft, ScoreGatesSelector, Selector


class TopK(ScoreGatesSelector):
    """Each token takes the ``k`` experts with the highest selection scores.

    Gates are the unbiased scores of those experts (a balancing bias changes the choice,
    never the gate value).
    """

    def __init__(self, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = check_top_k(top_k, num_experts)

    def forward(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        assert draft.selection_scores_TE is not None and draft.scores_TE is not None
        _, topk_idx_TK = torch.topk(draft.selection_scores_TE, self.top_k, dim=-1)
        return topk_idx_TK, draft.scores_TE.gather(1, topk_idx_TK)


class GroupLimitedTopK(ScoreGatesSelector):
    """Top-k restricted to the ``group_topk`` best of ``num_groups`` expert groups (DeepSeek-V3)."""

    def __init__(self, num_experts: int, top_k: int, num_groups: int, group_topk: int) -> None:
        super().__init__()
        self.top_k = check_top_k(top_k, num_experts)
        self.num_groups = check_positive_int("num_groups", num_groups)
        self.group_topk = check_positive_int("group_topk", group_topk)
        if num_experts % num_groups:
            raise ConfigError(
                f"num_groups={num_groups} must divide num_experts={num_experts} (groups hold equal numbers of experts)."
            )
        if group_topk > num_groups:
            raise ConfigError(f"group_topk={group_topk} must be <= num_groups={num_groups}.")
        self.group_size = num_experts // num_groups
        if group_topk * self.group_size < top_k:
            raise ConfigError(
                f"group_topk={group_topk} groups of {self.group_size} experts hold fewer than top_k={top_k} "
                "experts; raise group_topk or lower num_groups."
            )
        self.experts_per_group_score = min(max(1, top_k // group_topk), self.group_size)

    def forward(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        assert draft.selection_scores_TE is not None and draft.scores_TE is not None
        sel_TE = draft.selection_scores_TE
        num_tokens = sel_TE.shape[0]
        sel_TGS = sel_TE.view(num_tokens, self.num_groups, self.group_size)
        group_score_TG = sel_TGS.topk(self.experts_per_group_score, dim=-1).values.sum(dim=-1)
        _, group_idx_TG = group_score_TG.topk(self.group_topk, dim=-1)
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, group_idx_TG, True)
        keep_TE = keep_TG.unsqueeze(-1).expand_as(sel_TGS).reshape(num_tokens, -1)
        masked_TE = sel_TE.masked_fill(~keep_TE, float("-inf"))
        _, topk_idx_TK = torch.topk(masked_TE, self.top_k, dim=-1)
        return topk_idx_TK, draft.scores_TE.gather(1, topk_idx_TK)
