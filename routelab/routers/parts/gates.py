"""Gate normalisation: the weights given to the selected experts.

* ``none``: the raw score of each selected expert (Switch top-1, DeepSeek-V1/V2, Qwen-MoE:
  "pre-softmax, no renorm").
* ``renorm``: the selected scores divided by their sum, times ``scaling_factor``
  (Mixtral/GShard "post-softmax" with softmax scores, DeepSeek-V3 with sigmoid scores
  and factor 2.5).
"""

from __future__ import annotations

import torch
from torch import nn

from routelab.core.validation import check_choice
from routelab.routers.parts.router import RoutingDraft

GATE_NORMS = ("none", "renorm")


class GateNorm(nn.Module):
    """Normalise the raw gates of the selected experts.

    Args:
        mode: ``none`` or ``renorm``.
        scaling_factor: multiplies the gates after normalisation.

    With softmax scores and k=1, ``renorm`` makes every gate exactly 1 and starves the
    router of gradient (Switch Transformers keeps the raw top-1 probability for this reason);
    presets refuse that combination.
    """

    def __init__(self, mode: str = "renorm", scaling_factor: float = 1.0) -> None:
        super().__init__()
        self.mode = check_choice("gate_norm", mode, GATE_NORMS)
        self.scaling_factor = float(scaling_factor)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, scaling_factor={self.scaling_factor}"

    def forward(self, gate_TK: torch.Tensor, topk_idx_TK: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        gate_TK = torch.where(topk_idx_TK >= 0, gate_TK, torch.zeros_like(gate_TK))
        if self.mode == "renorm":
            gate_TK = gate_TK / gate_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        if self.scaling_factor != 1.0:
            gate_TK = gate_TK * self.scaling_factor
        return gate_TK
