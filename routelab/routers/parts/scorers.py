"""Scorers: ``x_TD`` -> ``logits_TE``.

* ``LinearScorer``: ``z = x W_r^T`` without bias, with optional multiplicative input
  jitter (Switch Transformer, Fedus et al. 2021) and an option to freeze the weights
  (random-fixed routing, "Equifinality", arXiv 2604.14419).
* ``NoisyLinearScorer``: noisy top-k gating of Shazeer et al. 2017 ("Outrageously Large
  Neural Networks"): ``H = z + eps * softplus(x W_noise^T)`` in training.
* ``ConstantScorer``: all-zero logits, for routers that ignore the hidden state (hash).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from routelab.routers.parts.router import RoutingDraft, Scorer


def apply_input_jitter(x_TD: torch.Tensor, eps: float, training: bool) -> torch.Tensor:
    """Multiply the router input by ``U(1-eps, 1+eps)`` noise in training (Switch Transformer)."""
    if not training or eps <= 0:
        return x_TD
    noise = torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
    return x_TD * noise


class LinearScorer(Scorer):
    """``logits = jitter(x) W_r^T`` in fp32.

    Args:
        d_model, num_experts: shapes of ``W_r`` (``[E, D]``).
        init_std: std of the normal initialisation (0 gives an all-zero router).
        jitter_eps: input jitter amplitude (0 = off).
        trainable: False freezes ``W_r`` (random-fixed routing); it is then a buffer.
        seed: when given, ``W_r`` is drawn from this seed (reproducible fixed routers).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        init_std: float = 0.02,
        jitter_eps: float = 0.0,
        trainable: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.init_std = float(init_std)
        weight = torch.randn(num_experts, d_model, generator=generator) * init_std
        if trainable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)
        self.jitter_eps = float(jitter_eps)

    def forward(self, x_TD: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        x_TD = apply_input_jitter(x_TD, self.jitter_eps, draft.training)
        return F.linear(x_TD, self.weight.float())


class NoisyLinearScorer(Scorer):
    """Noisy top-k gating (Shazeer et al. 2017): ``H = z + N(0,1) * (softplus(x W_noise^T) + floor)``.

    Both matrices start at zero as in the paper. In training the returned logits are the
    noisy ``H``; the clean ``z`` and the noise std are left in ``draft.extras`` for the
    load loss. In eval no noise is added.
    """

    def __init__(
        self, d_model: int, num_experts: int, *, noise_floor: float = 1e-2, jitter_eps: float = 0.0
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, d_model))
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model))
        self.noise_floor = float(noise_floor)
        self.jitter_eps = float(jitter_eps)

    def forward(self, x_TD: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        x_TD = apply_input_jitter(x_TD, self.jitter_eps, draft.training)
        clean_TE = F.linear(x_TD, self.weight.float())
        if not draft.training:
            return clean_TE
        std_TE = F.softplus(F.linear(x_TD, self.noise_weight.float())) + self.noise_floor
        noisy_TE = clean_TE + torch.randn_like(clean_TE) * std_TE
        draft.extras["clean_logits_TE"] = clean_TE
        draft.extras["noise_std_TE"] = std_TE
        return noisy_TE


class ConstantScorer(Scorer):
    """All-zero logits: for routers whose choice does not depend on the hidden state."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts

    def forward(self, x_TD: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        return x_TD.new_zeros(x_TD.shape[0], self.num_experts)
