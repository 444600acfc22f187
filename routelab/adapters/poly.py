"""Polytropon and Multi-Head Routing (MHR): a learned skill distribution per task.

Polytropon (Ponti et al. 2022, "Combining Modular Skills in Multitask Learning",
arXiv 2202.13914) and MHR (Caccia et al. 2023, "Multi-Head Adapter Routing for
Cross-Task Generalization", arXiv 2211.03831), as in ``microsoft/mttl``'s Polytropon
selector: per routed linear, logits ``Z [n_tasks, h*S]`` initialised ``U(-1e-3, 1e-3)``;
training weights are a relaxed-Bernoulli sample (temperature 1) of ``Z_task``, evaluation
weights ``sigmoid(Z_task)``; each head's weights are then normalised
``w / (sum_s w + 1e-12)``. The skills are mixed in weight space (``mixed_delta``) with the
``1/r`` scaling. ``h = 1`` is Polytropon, ``h > 1`` MHR.

Fine-tuning modes (mttl's ``pl_finetune``): ``poly`` (task logits and skills), ``z``
(MHR-z: the logits only) and ``mu`` (MHR-mu: skills averaged into one adapter, routing
replaced by the fixed average, the adapter fine-tuned); see ``routelab.adapters.finetune``.
Task id ``-1`` (an unknown task) gets logits 0, i.e. uniform weights (mttl's
``allow_unknown_tasks`` average row).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import RelaxedBernoulli

from routelab.adapters.routing import AdapterRouter, AdapterRouting, build_routing, dense_slots
from routelab.core import ConfigError, InputError, TokenBatch
from routelab.core.validation import check_positive_int

EPS = 1e-12


class PolyRouter(AdapterRouter):
    """Per-task skill logits ``Z [num_tasks, num_heads * num_skills]`` (see the module docstring).

    Args:
        uniform: fixed ``1/S`` weights for every task (MHR-mu's averaged selector).
        temperature: of the relaxed Bernoulli used in training.
    """

    def __init__(self, num_tasks: int, num_skills: int, num_heads: int = 1, *, temperature: float = 1.0,
                 uniform: bool = False, init_range: float = 1e-3) -> None:
        super().__init__()
        self.num_tasks = check_positive_int("num_tasks", num_tasks)
        self.num_skills = check_positive_int("num_skills", num_skills)
        self.num_heads = check_positive_int("num_heads", num_heads)
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)
        self.uniform = bool(uniform)
        self.logits = nn.Parameter(torch.empty(num_tasks, num_heads * num_skills).uniform_(-init_range, init_range))

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, num_skills={self.num_skills}, num_heads={self.num_heads}, uniform={self.uniform}"

    def task_logits(self, task_ids_B: torch.Tensor) -> torch.Tensor:
        """``[B, h, S]`` logits of each sequence's task (zeros for unknown tasks, id ``-1``)."""
        if bool((task_ids_B >= self.num_tasks).any()) or bool((task_ids_B < -1).any()):
            raise InputError(f"task ids must lie in [-1, {self.num_tasks}) (-1 = unknown task), got {task_ids_B.tolist()}.")
        z_BX = torch.where((task_ids_B >= 0).unsqueeze(1), self.logits[task_ids_B.clamp_min(0)], torch.zeros(()))
        return z_BX.view(-1, self.num_heads, self.num_skills)

    def mixture(self, task_ids_B: torch.Tensor) -> torch.Tensor:
        """``[B, h, S]`` per-head skill weights (each head sums to 1)."""
        if self.uniform:
            return self.logits.new_full((task_ids_B.shape[0], self.num_heads, self.num_skills), 1.0 / self.num_skills)
        z_BGE = self.task_logits(task_ids_B)
        if self.training:
            w_BGE = RelaxedBernoulli(torch.tensor(self.temperature, device=z_BGE.device), logits=z_BGE).rsample()
        else:
            w_BGE = torch.sigmoid(z_BGE)
        return w_BGE / (w_BGE.sum(dim=-1, keepdim=True) + EPS)

    def forward(self, x_TD: torch.Tensor, batch: TokenBatch, task_ids_T: torch.Tensor | None) -> AdapterRouting:
        if task_ids_T is None:
            raise InputError("Polytropon/MHR routing needs task ids; pass task_ids= to AdapterSet.context(...).")
        task_ids_B = torch.full((batch.batch_size,), -1, dtype=torch.int64, device=x_TD.device)
        task_ids_B[batch.seq_id_T] = task_ids_T
        w_BGE = self.mixture(task_ids_B)
        num_pairs = self.num_heads * self.num_skills
        w_TX = w_BGE.reshape(-1, num_pairs)[batch.seq_id_T] / self.num_heads
        logits_TX = self.task_logits(task_ids_B).reshape(-1, num_pairs)[batch.seq_id_T].float()
        idx_TX = dense_slots(x_TD.shape[0], num_pairs, x_TD.device)
        return build_routing(idx_TX, w_TX.float(), logits_TX, w_TX.float(), num_pairs, mixture_BGE=w_BGE)
