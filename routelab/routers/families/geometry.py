"""Geometric routers: low-dimensional cosine routing, SRA, parameter-free online k-means.

Parameter-free online k-means routing.

"Routers Learn the Geometry of Their Experts" (arXiv 2605.12476) proposes a router with no
trainable parameters: expert centroids ``mu_e`` are running means of the (normalised,
detached) hidden states routed to them; tokens go to the top-k experts by
``cos(x, mu_e)``. [paper abstract; the update details are a reconstruction]:

* score ``tau * cos(x, mu_e)`` (``tau`` fixed, 10), softmax; gates = the softmax
  renormalised over the selected experts, or uniform ``1/k``;
* during training forwards, the sums and counts of ``x_hat = x / ||x||`` per selected
  expert are accumulated (``x_hat`` detached); ``end_of_step`` applies them once per
  optimizer step (all-reduced over data-parallel ranks):
  running mean ``mu_e += (S_e - n_e' mu_e) / (n_e + n_e')`` or EMA
  ``mu_e = (1 - eta) mu_e + eta S_e / n_e'``;
* initialisation from the first training batch: k-means++ (default) or random tokens,
  chosen during that batch's forward and applied by its ``end_of_step`` (the first batch
  is routed by the random unit vectors the centroids start from; its statistics are
  discarded);
* a centroid unused for ``reseed_after`` consecutive steps is re-seeded with a random
  token of the last training batch and its count reset.

Each token is accumulated into the centroids of the experts this scorer ranks highest,
which is the router's own selection (nothing else in the preset changes it).

Low-dimensional cosine routing against learned centroids.

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
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from routelab.core.errors import ConfigError
from routelab.core.validation import check_choice, check_non_negative, check_positive_int, check_probability
from routelab.routers.parts.assembly import assemble_router, softmax_gate_mode
from routelab.routers.parts.gates import GateNorm
from routelab.routers.parts.randomness import RandomSource
from routelab.routers.parts.router import Router, RouterLoss, RoutingDraft, Scorer, StatefulPart
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset

UPDATES = ("mean", "ema")
INITS = ("kmeans++", "random")
COS_EPS = 1e-8


def kmeans_plus_plus(points_TD: torch.Tensor, num_centroids: int, random: RandomSource) -> torch.Tensor:
    """k-means++ seeding on unit vectors (squared Euclidean distance ``2 - 2 cos``)."""
    num_points = points_TD.shape[0]
    device = points_TD.device
    generator = random.generator(device)
    first = int(torch.randint(num_points, (1,), generator=generator, device=device))
    chosen = [first]
    dist2_T = (points_TD - points_TD[first]).square().sum(dim=1)
    for _ in range(1, num_centroids):
        weights = dist2_T.clamp_min(0)
        if not bool(weights.sum() > 0):
            weights = torch.ones_like(weights)
        nxt = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(nxt)
        dist2_T = torch.minimum(dist2_T, (points_TD - points_TD[nxt]).square().sum(dim=1))
    return points_TD[torch.tensor(chosen, device=device)].clone()


class OnlineKMeansScorer(Scorer, StatefulPart):
    """``tau * cos(x, mu_e)`` against centroids that follow the routed hidden states.

    Args:
        d_model, num_experts, top_k: shapes (the scorer tracks its own top-k assignment).
        tau: fixed temperature of the softmax scores.
        update: ``mean`` (running mean) or ``ema``.
        ema_rate: ``eta`` of the EMA update.
        init: ``kmeans++`` or ``random`` tokens of the first training batch.
        reseed_after: re-seed a centroid unused for this many consecutive steps (0 = never).
        seed: generator seed for initialisation and re-seeding (None = global generator).
        all_reduce: sum statistics over the default process group when initialised.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        tau: float,
        update: str,
        ema_rate: float,
        init: str,
        reseed_after: int,
        seed: int | None,
        all_reduce: bool = True,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.tau = float(tau)
        if not self.tau > 0:
            raise ConfigError(f"kmeans_tau must be > 0, got {tau}.")
        self.update = check_choice("kmeans_update", update, UPDATES)
        self.ema_rate = check_probability("kmeans_ema_rate", ema_rate, open_low=True)
        self.init = check_choice("kmeans_init", init, INITS)
        self.reseed_after = check_positive_int("kmeans_reseed_after", reseed_after, minimum=0)
        self.random = RandomSource(seed)
        self.all_reduce = all_reduce
        start = F.normalize(torch.randn(num_experts, d_model, generator=self.random.generator("cpu")), dim=-1)
        self.register_buffer("centroids", start)
        self.register_buffer("counts", torch.zeros(num_experts))
        self.register_buffer("unused_steps", torch.zeros(num_experts, dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("pending_sum", torch.zeros(num_experts, d_model), persistent=False)
        self.register_buffer("pending_count", torch.zeros(num_experts), persistent=False)
        self.register_buffer("pending_seed", torch.zeros(num_experts, d_model), persistent=False)
        self.register_buffer("has_seed", torch.zeros((), dtype=torch.bool), persistent=False)
        self.register_buffer("candidates", torch.zeros(num_experts, d_model), persistent=False)
        self.register_buffer("num_candidates", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, x_TD: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        cos_TE = F.normalize(x_TD, dim=-1, eps=COS_EPS) @ F.normalize(self.centroids, dim=-1, eps=COS_EPS).t()
        logits_TE = self.tau * cos_TE
        if draft.training and x_TD.shape[0]:
            with torch.no_grad():
                self._observe(F.normalize(x_TD.detach(), dim=-1, eps=COS_EPS), logits_TE.detach())
        return logits_TE

    def _observe(self, x_hat_TD: torch.Tensor, logits_TE: torch.Tensor) -> None:
        num_tokens = x_hat_TD.shape[0]
        if not bool(self.initialized) and not bool(self.has_seed):
            if self.init == "kmeans++":
                seed_ED = kmeans_plus_plus(x_hat_TD, self.num_experts, self.random)
            else:
                order = self.random.randperm(num_tokens, x_hat_TD.device)
                rows = order[torch.arange(self.num_experts, device=x_hat_TD.device) % num_tokens]
                seed_ED = x_hat_TD[rows]
            self.pending_seed.copy_(seed_ED)
            self.has_seed.fill_(True)
        top_k = min(self.top_k, self.num_experts)
        topk_idx_TK = torch.topk(logits_TE, top_k, dim=-1).indices
        routed_TE = torch.zeros_like(logits_TE).scatter_(1, topk_idx_TK, 1.0)
        self.pending_sum += routed_TE.t() @ x_hat_TD
        self.pending_count += routed_TE.sum(dim=0)
        take = min(num_tokens, self.num_experts)
        rows = self.random.randperm(num_tokens, x_hat_TD.device)[:take]
        self.candidates[:take] = x_hat_TD[rows]
        self.num_candidates.fill_(take)

    @torch.no_grad()
    def end_of_step(self) -> None:
        if self.all_reduce and dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.pending_sum)
            dist.all_reduce(self.pending_count)
        try:
            if not bool(self.initialized):
                if bool(self.has_seed):
                    self.centroids.copy_(self.pending_seed)
                    self.counts.zero_()
                    self.initialized.fill_(True)
                return
            self._apply_update()
        finally:
            self.pending_sum.zero_()
            self.pending_count.zero_()
            self.has_seed.fill_(False)

    def _apply_update(self) -> None:
        count_E = self.pending_count
        used_E = count_E > 0
        if self.update == "mean":
            denom_E = (self.counts + count_E).clamp_min(1.0).unsqueeze(1)
            step_ED = (self.pending_sum - count_E.unsqueeze(1) * self.centroids) / denom_E
            self.centroids += torch.where(used_E.unsqueeze(1), step_ED, torch.zeros_like(step_ED))
        else:
            mean_ED = self.pending_sum / count_E.clamp_min(1.0).unsqueeze(1)
            ema_ED = (1 - self.ema_rate) * self.centroids + self.ema_rate * mean_ED
            self.centroids.copy_(torch.where(used_E.unsqueeze(1), ema_ED, self.centroids))
        self.counts += count_E
        self.unused_steps.copy_(torch.where(used_E, torch.zeros_like(self.unused_steps), self.unused_steps + 1))
        if self.reseed_after and int(self.num_candidates) > 0:
            dead = (self.unused_steps >= self.reseed_after).nonzero(as_tuple=True)[0]
            if dead.numel():
                pick = torch.arange(dead.numel(), device=dead.device) % int(self.num_candidates)
                self.centroids[dead] = self.candidates[pick]
                self.counts[dead] = 0.0
                self.unused_steps[dead] = 0


class UniformGate(torch.nn.Module):
    """Gate normalisation giving every selected expert the same weight ``1/k``."""

    def forward(self, gate_TK: torch.Tensor, topk_idx_TK: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        valid_TK = topk_idx_TK >= 0
        count_T1 = valid_TK.sum(dim=-1, keepdim=True).clamp_min(1).to(gate_TK.dtype)
        return valid_TK.to(gate_TK.dtype) / count_T1




class CosineScorer(Scorer):
    """``|tau| * cos(P x, c_e)``.

    Args:
        d_model, num_experts: shapes.
        proj_dim: ``d_s``; None routes in the model space (``P = I``, SRA).
        tau_init: initial temperature (10).
        learn_tau: False keeps ``tau`` fixed (a buffer).
    """

    def __init__(
        self, d_model: int, num_experts: int, *, proj_dim: int | None, tau_init: float, learn_tau: bool
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
        u_TF = x_TD if self.proj is None else x_TD @ self.proj.float().t()
        cos_TE = F.normalize(u_TF, dim=-1, eps=COS_EPS) @ F.normalize(self.centroids.float(), dim=-1, eps=COS_EPS).t()
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


_TOP1_RAW = "holds for top_k > 1; top-1 keeps the full-softmax probability so the router still gets a gradient"


def cosine_router(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    proj_dim: int | None,
    tau_init: float,
    learn_tau: bool,
    normalization: str,
    bandpass_loss_coef: float,
    bandpass_low: float | None,
    bandpass_high: float | None,
) -> Router:
    extra_losses: list[RouterLoss] = []
    coef = check_non_negative("bandpass_loss_coef", bandpass_loss_coef)
    for option, value in (("bandpass_low", bandpass_low), ("bandpass_high", bandpass_high)):
        if value is not None and not coef:
            raise ConfigError(f"{option}={value} sets the band of the bandpass loss, which is off; set "
                              "bandpass_loss_coef > 0 too, or leave it out.")
    if coef:
        low, high = default_band(spec.num_experts)
        low = low if bandpass_low is None else bandpass_low
        high = high if bandpass_high is None else bandpass_high
        extra_losses.append(BandpassLoss(coef, low, high))
    return assemble_router(
        spec,
        common,
        scorer=CosineScorer(spec.d_model, spec.num_experts, proj_dim=proj_dim, tau_init=tau_init, learn_tau=learn_tau),
        gate_mode=softmax_gate_mode(normalization, spec.top_k),
        extra_losses=extra_losses,
    )


@register_preset(
    "cosine",
    description="z = |tau| cos(P x, c_e) with a d_s=64 projection and learned centroids; softmax over all, "
    "top-k renormalised for k>1",
    paper="Equifinality in Mixture-of-Experts Routing (arXiv 2604.14419), low-dimensional cosine router",
    default_top_k=2,
    exemptions={"weights_sum_to_one": _TOP1_RAW},
)
def build_cosine(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    proj_dim: int | None = 64,
    tau_init: float = 10.0,
    learn_tau: bool = True,
    normalization: str = "auto",
    bandpass_loss_coef: float = 0.0,
    bandpass_low: float | None = None,
    bandpass_high: float | None = None,
) -> Router:
    """Low-dimensional cosine routing: ``u = P x`` (``proj_dim`` = d_s; None = no projection),
    ``z = |tau| cos(u, c_e)`` with learnable ``tau`` (init 10) and orthogonally initialised
    centroids; softmax over all experts, top-k, renormalised for k > 1. Optional SRA
    bandpass loss (``bandpass_loss_coef``; band defaults to SRA's 1e-3..2e-2 at 128
    experts, scaled to ``E``). Multi-hop application with relative-norm halting:
    ``routelab.moe.apply_hops``.
    """
    return cosine_router(
        spec, common, proj_dim=proj_dim, tau_init=tau_init, learn_tau=learn_tau, normalization=normalization,
        bandpass_loss_coef=bandpass_loss_coef, bandpass_low=bandpass_low, bandpass_high=bandpass_high,
    )


@register_preset(
    "sra",
    description="cosine routing against anchors in the model space (no projection), learnable |tau|, "
    "bandpass balance loss 0.4",
    paper="Semantic Resonance Architecture (ITernovtsii/semantic-resonance), cosine routing + bandpass loss",
    default_top_k=1,
    exemptions={"weights_sum_to_one": _TOP1_RAW},
)
def build_sra(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    tau_init: float = 10.0,
    normalization: str = "auto",
    bandpass_loss_coef: float = 0.4,
    bandpass_low: float | None = None,
    bandpass_high: float | None = None,
) -> Router:
    """SRA: ``z = |tau| cos(x, a_e)`` (anchors ``a_e`` orthogonal, ``tau`` init 10), softmax over
    all experts, top-k (renormalised for k > 1), bandpass loss ``E^2 mean_e[relu(p_lo -
    P_e)^2 + relu(P_e - p_hi)^2]`` with weight 0.4. SRA's 1e-3..2e-2 band was set for 128
    experts; by default it is scaled to ``E`` (0.128/E..2.56/E). SRA's top-k schedule
    (1 -> 4 at epoch 3) is a training-loop matter and not part of the router.
    """
    return cosine_router(
        spec, common, proj_dim=None, tau_init=tau_init, learn_tau=True, normalization=normalization,
        bandpass_loss_coef=bandpass_loss_coef, bandpass_low=bandpass_low, bandpass_high=bandpass_high,
    )


@register_preset(
    "kmeans",
    description="parameter-free: centroids are running means of the routed (normalised) hidden states, "
    "updated in end_of_step; top-k by cosine",
    paper="Routers Learn the Geometry of Their Experts (arXiv 2605.12476), online k-means router",
    default_top_k=1,
)
def build_kmeans(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    kmeans_tau: float = 10.0,
    kmeans_gate: str = "softmax",
    kmeans_update: str = "mean",
    kmeans_ema_rate: float = 0.05,
    kmeans_init: str = "kmeans++",
    kmeans_reseed_after: int = 100,
    seed: int | None = None,
) -> Router:
    """Online k-means routing [update details recon]: experts = top-k of ``cos(x, mu_e)``;
    gates = ``softmax(kmeans_tau * cos)`` renormalised over the selection (``kmeans_gate=
    'softmax'``) or ``1/k`` (``'uniform'``). Centroids are running means (or EMA with rate
    ``kmeans_ema_rate``) of the routed ``x/||x||``, applied once per optimizer step in
    ``end_of_step``; initialised by k-means++ (or random tokens) on the first training
    batch; a centroid unused for ``kmeans_reseed_after`` steps is re-seeded. No trainable
    parameters.
    """
    check_choice("kmeans_gate", kmeans_gate, ("softmax", "uniform"))
    scorer = OnlineKMeansScorer(
        spec.d_model,
        spec.num_experts,
        spec.top_k,
        tau=kmeans_tau,
        update=kmeans_update,
        ema_rate=kmeans_ema_rate,
        init=kmeans_init,
        reseed_after=kmeans_reseed_after,
        seed=seed,
    )
    return assemble_router(
        spec, common, scorer=scorer, gate_norm=GateNorm("renorm") if kmeans_gate == "softmax" else UniformGate()
    )
