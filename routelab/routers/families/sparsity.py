"""MoE-X sparsity-aware routing preset (Yang et al. 2025).

Sparsity-aware routing of MoE-X (Yang et al. 2025, "Mixture of Experts Made
Intrinsically Interpretable", arXiv 2503.07639).

MoE-X experts are ReLU MLPs ``f_j(x) = W_dec^j ReLU(W_enc^j x)`` and tokens go to the
experts whose hidden activation would be *sparsest*, estimated without running them.
Treat the encoder weights as Gaussian; a hidden unit's pre-activation ``h = w^T x`` is
then ``N(mean, var)`` and the expected active fraction is ``rho_j(x) = Phi(mean / std)``:

* ``per-expert`` statistics (one reading of the paper): ``mu_j``, ``sigma_j`` are the
  mean and std of all entries of ``W_enc^j``; ``mean = mu_j sum_i x_i``,
  ``std = sigma_j ||x||``;
* ``per-input`` statistics (default): ``mu_ji``, ``sigma_ji`` are taken per input
  feature over the hidden units; ``mean = sum_i mu_ji x_i``,
  ``std = sqrt(sum_i sigma_ji^2 x_i^2)``. With shared statistics it reduces to the
  per-expert estimate; unlike it, it depends on the token's direction (the per-expert
  estimate depends on ``x`` only through ``sum(x) / ||x||``, so every token with the same
  sign of ``sum(x)`` would rank the experts identically) [recon].

Logits ``z_j = -rho_j / tau`` (``score='neg'``) or ``log(1 - rho_j) / tau`` (``'log'``);
top-k; gates are the softmax of the selected logits. The statistics are recomputed from
the live weights in every forward and are differentiable. The sign convention and gate
form follow the paper's description; the exact estimator is a reconstruction [recon].
"""

from __future__ import annotations

import math

import torch

from routelab.core.errors import ConfigError
from routelab.core.validation import check_choice
from routelab.routers.parts.assembly import assemble_router, softmax_gate_mode
from routelab.routers.parts.expert_access import UsesExperts
from routelab.routers.parts.router import Router, RoutingDraft, Scorer
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset

STAT_MODES = ("per-input", "per-expert")
SCORE_FORMS = ("neg", "log")


def normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def expected_active_fraction(x_TD: torch.Tensor, w_enc_EDH: torch.Tensor, stats: str = "per-input", eps: float = 1e-6) -> torch.Tensor:
    """``rho_TE``: the estimated fraction of each expert's hidden units with ``h > 0``."""
    check_choice("moex_stats", stats, STAT_MODES)
    if stats == "per-expert":
        var_E, mu_E = torch.var_mean(w_enc_EDH, dim=(1, 2), unbiased=False)
        mean_TE = x_TD.sum(dim=-1, keepdim=True) * mu_E.unsqueeze(0)
        std_TE = x_TD.norm(dim=-1, keepdim=True) * var_E.sqrt().unsqueeze(0)
    else:
        var_ED, mu_ED = torch.var_mean(w_enc_EDH, dim=2, unbiased=False)
        mean_TE = x_TD @ mu_ED.transpose(0, 1)
        std_TE = (x_TD.square() @ var_ED.transpose(0, 1)).clamp_min(0).sqrt()
    return normal_cdf(mean_TE / std_TE.clamp_min(eps))


class SparsityAwareScorer(Scorer, UsesExperts):
    """MoE-X logits from the attached experts' encoder weights (see module docstring).

    Args:
        num_experts: ``E``.
        stats: ``per-input`` (default) or ``per-expert``.
        score: ``neg`` (``-rho``) or ``log`` (``log(1 - rho)``).
        temperature: ``tau`` dividing the logits (> 0).
    """

    def __init__(self, num_experts: int, *, stats: str, score: str, temperature: float) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.stats = check_choice("moex_stats", stats, STAT_MODES)
        self.score = check_choice("moex_score", score, SCORE_FORMS)
        self.temperature = float(temperature)
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"moex_temperature must be a finite number > 0, got {temperature}.")

    def extra_repr(self) -> str:
        return f"stats={self.stats!r}, score={self.score!r}, temperature={self.temperature}"

    def forward(self, x_TD: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        w_enc_EDH = self.expert_gate_projection(self.num_experts)
        if w_enc_EDH.shape[1] != x_TD.shape[1]:
            raise ConfigError(f"the experts read width {w_enc_EDH.shape[1]} but the router gets width {x_TD.shape[1]}.")
        rho_TE = expected_active_fraction(x_TD, w_enc_EDH, self.stats)
        draft.extras["expected_active_fraction_TE"] = rho_TE
        if self.score == "neg":
            return -rho_TE / self.temperature
        return torch.log1p(-rho_TE.clamp_max(1.0 - 1e-6)) / self.temperature


@register_preset(
    "moe-x",
    description="route to the experts whose ReLU activation is estimated sparsest, rho = Phi(mean/std) from the "
    "experts' encoder-weight statistics (no router weights; use activation='relu')",
    paper="Yang et al. 2025, Mixture of Experts Made Intrinsically Interpretable (MoE-X, arXiv 2503.07639)",
    default_top_k=2,
)
def build_moe_x(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    moex_stats: str = "per-input",
    moex_score: str = "neg",
    moex_temperature: float = 1.0,
    normalization: str = "auto",
) -> Router:
    """MoE-X sparsity-aware routing [recon]: logits ``-rho_j(x) / tau`` where ``rho_j`` is
    the Gaussian estimate of the fraction of expert j's hidden units that fire on ``x``
    (``moex_stats='per-input'``: weight mean/variance per input feature, default;
    ``'per-expert'``: one mean/std per expert, one reading of the paper; ``moex_score='log'``
    uses ``log(1 - rho)``). Top-k; gates are the softmax over the selected logits. The
    statistics come from the layer's expert weights (attached by ``routelab.MoE``); the
    paper's experts are ReLU MLPs: build the layer with ``activation='relu'``.
    """
    return assemble_router(
        spec,
        common,
        scorer=SparsityAwareScorer(spec.num_experts, stats=moex_stats, score=moex_score, temperature=moex_temperature),
        gate_mode=softmax_gate_mode(normalization, spec.top_k),
    )
