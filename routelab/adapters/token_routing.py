"""Token-level and fixed routing over LoRA experts.

- ``PresetRouter``: any router of the zoo (``routelab.create_router``: ``mixtral``,
  ``dynmole``, ``expert-choice``, ...) routing each token to k of the E LoRA experts.
  With ``dynmole`` this is DynMoLE's hybrid Tsallis routing of LoRA experts (Li et al.
  2025, arXiv 2504.00661).
- ``TaskExpertRouter``: token of task ``t`` -> expert ``expert_of_task[t]`` with weight 1
  (one LoRA per task, the oracle choice when tasks are known).
- ``UniformRouter``: every token -> every expert with weight ``1/E`` (uniform merge of the
  experts' updates, i.e. the average of ``B_e A_e``).
"""

from __future__ import annotations

import torch
from torch import nn

from routelab.adapters.routing import AdapterRouter, AdapterRouting, build_routing, dense_slots
from routelab.core import InputError, TokenBatch


class PresetRouter(AdapterRouter):
    """A zoo router (``routelab.Router``) over adapters: its ``Routing`` is passed on as is."""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.router = router

    def forward(self, x_TD: torch.Tensor, batch: TokenBatch, task_ids_T: torch.Tensor | None) -> AdapterRouting:
        routing = self.router(x_TD, batch)
        return build_routing(
            routing.topk_idx, routing.topk_weight, routing.logits, routing.scores, routing.num_experts,
            losses=routing.losses, aux_loss=routing.aux_loss,
        )


class TaskExpertRouter(AdapterRouter):
    """Each task's tokens go to one fixed expert (``expert_of_task[task]``) with weight 1."""

    def __init__(self, num_experts: int, expert_of_task: list[int]) -> None:
        super().__init__()
        self.num_experts = num_experts
        if any(not 0 <= e < num_experts for e in expert_of_task):
            raise InputError(f"expert_of_task={expert_of_task} must hold expert ids in [0, {num_experts}).")
        self.register_buffer("expert_of_task", torch.tensor(expert_of_task, dtype=torch.int64), persistent=False)

    def forward(self, x_TD: torch.Tensor, batch: TokenBatch, task_ids_T: torch.Tensor | None) -> AdapterRouting:
        if task_ids_T is None or bool((task_ids_T < 0).any()) or bool((task_ids_T >= len(self.expert_of_task)).any()):
            raise InputError(
                f"one-LoRA-per-task routing needs a known task id in [0, {len(self.expert_of_task)}) for every "
                "sequence; pass task_ids= to AdapterSet.context(...)."
            )
        idx_T1 = self.expert_of_task[task_ids_T].unsqueeze(1)
        logits_TE = torch.full((x_TD.shape[0], self.num_experts), float("-inf"), device=x_TD.device)
        logits_TE.scatter_(1, idx_T1, 0.0)
        return build_routing(idx_T1, torch.ones_like(idx_T1, dtype=torch.float32), logits_TE, logits_TE.softmax(-1),
                             self.num_experts)


class UniformRouter(AdapterRouter):
    """Every token to every expert with weight ``1/E`` (the uniform merge)."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts

    def forward(self, x_TD: torch.Tensor, batch: TokenBatch, task_ids_T: torch.Tensor | None) -> AdapterRouting:
        num_tokens = x_TD.shape[0]
        idx_TE = dense_slots(num_tokens, self.num_experts, x_TD.device)
        weight_TE = torch.full((num_tokens, self.num_experts), 1.0 / self.num_experts, device=x_TD.device)
        logits_TE = torch.zeros(num_tokens, self.num_experts, device=x_TD.device)
        return build_routing(idx_TE, weight_TE, logits_TE, weight_TE, self.num_experts)
