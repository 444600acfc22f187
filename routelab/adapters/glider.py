"""GLIDER: global task-level routing + local token-level routing over LoRA experts.

Li et al. 2024, "Glider: Global and Local Instruction-Driven Expert Router"
(arXiv 2410.07172, code ``UNITES-Lab/glider``), built on PHATGOOSE (Muqeeth et al. 2024,
"Learning to Route Among Specialized Experts for Zero-Shot Generalization",
arXiv 2402.05859). Per routed linear:

- local logits ``l_loc = (W_gate . LN(x)) * sqrt(1/d_in)``, ``LN`` a layer norm without
  affine parameters and ``W_gate [E, d_in]`` the stacked PHATGOOSE gate vectors;
- global scores ``g_e = cos(task embedding, embedding of expert e's task)``, one vector per
  task, the same for every layer and token (``set_task_similarity``);
- ``l = l_loc + s * g``; top-k (default 2) of ``softmax(l)``, renormalised
  ``w / (sum + 1e-6)``. ``s = 0`` is PHATGOOSE.

PHATGOOSE trains each gate vector after its expert, with the expert frozen: in
``gate_training(e)`` mode every token goes to expert ``e`` alone with weight
``sigmoid(l_loc[e])`` (the same normalised input as at routing time).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from routelab.adapters.routing import AdapterRouter, AdapterRouting, build_routing
from routelab.core import ConfigError, InputError, TokenBatch
from routelab.core.validation import check_positive_int, check_top_k

RENORM_EPS = 1e-6


class GliderRouter(AdapterRouter):
    """See the module docstring. ``global_scale`` is GLIDER's ``s`` (3 for held-out tasks in the
    paper's scripts, 100 held-in); ``num_tasks`` rows of task-expert similarity are kept."""

    def __init__(self, num_experts: int, d_in: int, num_tasks: int, *, top_k: int = 2, global_scale: float = 3.0) -> None:
        super().__init__()
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.top_k = check_top_k(top_k, num_experts)
        self.d_in = d_in
        self.global_scale = float(global_scale)
        if not math.isfinite(self.global_scale):
            raise ConfigError(f"global_scale must be finite, got {global_scale}.")
        self.gate = nn.Parameter(torch.zeros(num_experts, d_in))
        self.register_buffer("task_similarity", torch.zeros(check_positive_int("num_tasks", num_tasks), num_experts))
        self.trained_expert: int | None = None

    def set_task_similarity(self, similarity_NE: torch.Tensor) -> None:
        """Cosine similarity ``[num_tasks, E]`` between each task's embedding and each expert's."""
        if tuple(similarity_NE.shape) != tuple(self.task_similarity.shape):
            raise InputError(f"similarity must have shape {tuple(self.task_similarity.shape)}, got {tuple(similarity_NE.shape)}.")
        self.task_similarity.copy_(similarity_NE.to(self.task_similarity))

    def gate_training(self, expert: int | None) -> None:
        """PHATGOOSE gate training of ``expert`` (None returns to routing)."""
        if expert is not None and not 0 <= expert < self.num_experts:
            raise InputError(f"expert={expert} must lie in [0, {self.num_experts}).")
        self.trained_expert = expert

    def local_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        normed_TD = F.layer_norm(x_TD.float(), (x_TD.shape[-1],))
        return normed_TD @ self.gate.float().T * math.sqrt(1.0 / self.d_in)

    def forward(self, x_TD: torch.Tensor, batch: TokenBatch, task_ids_T: torch.Tensor | None) -> AdapterRouting:
        local_TE = self.local_logits(x_TD)
        if self.trained_expert is not None:
            idx_T1 = torch.full((x_TD.shape[0], 1), self.trained_expert, dtype=torch.int64, device=x_TD.device)
            gate_T1 = torch.sigmoid(local_TE[:, self.trained_expert : self.trained_expert + 1])
            return build_routing(idx_T1, gate_T1, local_TE, torch.sigmoid(local_TE), self.num_experts)
        logits_TE = local_TE
        if self.global_scale != 0.0:
            if task_ids_T is None or bool((task_ids_T < 0).any()):
                raise InputError("GLIDER's global router needs a known task id per sequence (task_ids=...); "
                                 "use global_scale=0 (PHATGOOSE) to route without tasks.")
            logits_TE = local_TE + self.global_scale * self.task_similarity[task_ids_T]
        return route_top_k(logits_TE, self.top_k)


def route_top_k(logits_TE: torch.Tensor, top_k: int) -> AdapterRouting:
    """softmax -> top-k -> renormalise ``w / (sum + 1e-6)`` (GLIDER/PHATGOOSE)."""
    probs_TE = logits_TE.softmax(dim=-1)
    weight_TK, idx_TK = probs_TE.topk(top_k, dim=-1)
    weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + RENORM_EPS)
    return build_routing(idx_TK, weight_TK, logits_TE, probs_TE, logits_TE.shape[-1])
