"""The ``Routing`` object: the one thing that flows from a router to dispatch and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from routelab.core.routing_stats import stats_to_python


@dataclass
class Routing:
    """Which experts each token goes to, with what weight, and what it cost.

    Shapes use ``T`` tokens (real tokens only, padding removed), ``E`` experts and ``K``
    slots per token.

    Attributes:
        topk_idx: int64 ``[T, K]`` expert ids; ``-1`` marks an empty slot (dynamic-k,
            expert choice, or an assignment dropped by capacity).
        topk_weight: ``[T, K]`` gate weights (fp32); exactly 0 in empty slots.
        logits: fp32 ``[T, E]`` router logits.
        scores: fp32 ``[T, E]`` scores after the score function (softmax, sigmoid, ...).
        losses: unweighted auxiliary losses by name (scalars, with grad).
        aux_loss: the coefficient-weighted sum of ``losses`` (a zero scalar if none).
        stats: per-batch statistics (see ``routelab.core.routing_stats.routing_stats``).
        num_experts: ``E``.
        capacity: the per-expert capacity enforced in this batch, or None when dropless.
    """

    topk_idx: torch.Tensor
    topk_weight: torch.Tensor
    logits: torch.Tensor
    scores: torch.Tensor
    num_experts: int
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_loss: torch.Tensor | None = None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    capacity: int | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.topk_idx.shape[0])

    @property
    def k_max(self) -> int:
        return int(self.topk_idx.shape[1])

    def dense_gates(self) -> torch.Tensor:
        """The ``[T, E]`` gate matrix (0 off-route), differentiable in the weights."""
        gates_TE = self.topk_weight.new_zeros(self.num_tokens, self.num_experts)
        valid_TK = self.topk_idx >= 0
        idx_TK = self.topk_idx.clamp_min(0)
        return gates_TE.scatter_add(1, idx_TK, torch.where(valid_TK, self.topk_weight, torch.zeros_like(self.topk_weight)))

    def mask(self) -> torch.Tensor:
        """The ``[T, E]`` boolean assignment mask."""
        mask_TE = torch.zeros(self.num_tokens, self.num_experts, dtype=torch.bool, device=self.topk_idx.device)
        valid_TK = self.topk_idx >= 0
        rows = torch.arange(self.num_tokens, device=self.topk_idx.device).unsqueeze(1).expand_as(self.topk_idx)
        mask_TE[rows[valid_TK], self.topk_idx[valid_TK]] = True
        return mask_TE

    def stats_dict(self) -> dict[str, float | list[float]]:
        """``stats`` as plain Python numbers, for logging."""
        return stats_to_python(self.stats)

    def loss_dict(self) -> dict[str, float]:
        """``losses`` as plain Python floats, for logging."""
        return {k: float(v.detach()) for k, v in self.losses.items()}
