"""Score functions: ``logits_TE`` -> ``scores_TE`` (always fp32)."""

from __future__ import annotations

import torch

from routelab.core.errors import unknown_name
from routelab.routers.parts.router import RoutingDraft, ScoreFunction


class Softmax(ScoreFunction):
    """Softmax over experts (Shazeer 2017, Switch, GShard, Mixtral)."""

    probabilities = True

    def forward(self, logits_TE: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        return torch.softmax(logits_TE, dim=-1)


class Sigmoid(ScoreFunction):
    """Independent sigmoid per expert (DeepSeek-V3)."""

    def forward(self, logits_TE: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        return torch.sigmoid(logits_TE)


class ReLU(ScoreFunction):
    """ReLU scores (ReMoE); zero scores mean "not routed"."""

    def forward(self, logits_TE: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        return torch.relu(logits_TE)


class Identity(ScoreFunction):
    """Scores equal the logits (routers whose scorer already returns scores)."""

    def forward(self, logits_TE: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        return logits_TE


SCORE_FUNCTIONS: dict[str, type[ScoreFunction]] = {
    "softmax": Softmax,
    "sigmoid": Sigmoid,
    "relu": ReLU,
    "identity": Identity,
}


def make_score_function(name: str) -> ScoreFunction:
    """Build a score function by name (``softmax``, ``sigmoid``, ``relu``, ``identity``)."""
    if name not in SCORE_FUNCTIONS:
        raise unknown_name("score function", "score_fn", name, SCORE_FUNCTIONS)
    return SCORE_FUNCTIONS[name]()
