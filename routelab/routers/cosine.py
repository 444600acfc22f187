"""Low-dimensional cosine routing against learned centroids (spec §6).

"Equifinality in Mixture-of-Experts Routing" (arXiv 2604.14419) routes with ``z_e =
|tau| * cos(P x, c_e)``: a learned projection ``P`` to ``d_s = 64`` dimensions, learned
centroids ``c_e`` (orthogonal init) and one learnable temperature ``tau`` (init 10; the
absolute value keeps a sign flip from inverting the routing). Softmax over all experts,
then top-k, renormalised when ``k > 1`` (no gradient starvation at k = 1). The routing
parameters are ``d*d_s + E*d_s + 1`` instead of ``d*E``.

Semantic Resonance Architecture (SRA, ``ITernovtsii/semantic-resonance``
``src/models/csr.py``) is the same router with ``P = I`` (cosine against anchors in the
model space) and a bandpass balance loss (``src/training/losses.py``):

    L = E^2 * mean_e [relu(p_lo - P_e)^2 + relu(P_e - p_hi)^2],   P_e = mean_t softmax(z)_te,

zero while every expert's mean probability lies in ``[p_lo, p_hi]``. SRA uses
``p_lo = 1e-3``, ``p_hi = 2e-2`` with 128 experts (0.128x and 2.56x the uniform share);
routelab's defaults keep those ratios for any ``E``.

Routing is invariant to the scale of ``x`` and ``|z| <= |tau|``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from routelab.core.errors import ConfigError
from routelab.routers.base import RouterLoss, RoutingDraft, Scorer

COS_EPS = 1e-8


class CosineScorer(Scorer):
    """``|tau| * cos(P x, c_e)``.

    Args:
        d_model, num_experts: shapes.
        proj_dim: ``d_s``; None routes in the model space (``P = I``, SRA).
        tau_init: initial temperature (10).
        learn_tau: False keeps ``tau`` fixed (a buffer).
    """

    def __init__(
        self, d_model: int, num_experts: int, *, proj_dim: int | None = 64, tau_init: float = 10.0, learn_tau: bool = True
    ) -> None:
        super().__init__()
        space = d_model
        if proj_dim is not None:
            if isinstance(proj_dim, bool) or not isinstance(proj_dim, int) or proj_dim < 1:
                raise ConfigError(f"proj_dim must be an integer >= 1 or None (no projection), got {proj_dim!r}.")
            self.proj = nn.Parameter(torch.randn(proj_dim, d_model) / math.sqrt(d_model))
            space = proj_dim
        else:
            self.proj = None
        centroids = torch.empty(num_experts, space)
        nn.init.orthogonal_(centroids)
        self.centroids = nn.Parameter(centroids)
        tau = torch.tensor(float(tau_init))
        if not math.isfinite(float(tau_init)) or float(tau_init) == 0.0:
            raise ConfigError(f"tau_init must be a finite non-zero number, got {tau_init!r}.")
        if learn_tau:
            self.tau = nn.Parameter(tau)
        else:
            self.register_buffer("tau", tau)

    def forward(self, x_TD: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        u_TS = x_TD if self.proj is None else x_TD @ self.proj.float().t()
        cos_TE = F.normalize(u_TS, dim=-1, eps=COS_EPS) @ F.normalize(self.centroids.float(), dim=-1, eps=COS_EPS).t()
        return self.tau.float().abs() * cos_TE


def default_band(num_experts: int) -> tuple[float, float]:
    """SRA's band ``[1e-3, 2e-2]`` at 128 experts, as multiples of the uniform share ``1/E``."""
    return 0.128 / num_experts, 2.56 / num_experts


class BandpassLoss(RouterLoss):
    """SRA bandpass balance loss ``E^2 mean_e[relu(p_lo - P_e)^2 + relu(P_e - p_hi)^2]`` (unweighted)."""

    def __init__(self, coef: float, p_low: float, p_high: float, name: str = "bandpass") -> None:
        super().__init__(name, coef)
        if not 0 <= p_low < p_high <= 1:
            raise ConfigError(f"need 0 <= bandpass_low < bandpass_high <= 1, got {p_low} and {p_high}.")
        self.p_low, self.p_high = float(p_low), float(p_high)

    def forward(self, draft: RoutingDraft) -> torch.Tensor:
        mean_E = draft.probs_TE().mean(dim=0)
        penalty_E = torch.relu(self.p_low - mean_E) ** 2 + torch.relu(mean_E - self.p_high) ** 2
        return draft.num_experts**2 * penalty_E.mean()
