"""Parameter-free online k-means routing (spec §7).

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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from routelab.core.errors import ConfigError
from routelab.core.validation import check_choice, check_positive_int, check_probability
from routelab.routers.base import RoutingDraft, Scorer, StatefulPart
from routelab.routers.randomness import RandomSource

UPDATES = ("mean", "ema")
INITS = ("kmeans++", "random")
COS_EPS = 1e-8


def kmeans_plus_plus(points_ND: torch.Tensor, num_centroids: int, random: RandomSource) -> torch.Tensor:
    """k-means++ seeding on unit vectors (squared Euclidean distance ``2 - 2 cos``)."""
    num_points = points_ND.shape[0]
    device = points_ND.device
    generator = random.generator(device)
    first = int(torch.randint(num_points, (1,), generator=generator, device=device))
    chosen = [first]
    dist2_N = (points_ND - points_ND[first]).square().sum(dim=1)
    for _ in range(1, num_centroids):
        weights = dist2_N.clamp_min(0)
        if not bool(weights.sum() > 0):
            weights = torch.ones_like(weights)
        nxt = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(nxt)
        dist2_N = torch.minimum(dist2_N, (points_ND - points_ND[nxt]).square().sum(dim=1))
    return points_ND[torch.tensor(chosen, device=device)].clone()


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
        tau: float = 10.0,
        update: str = "mean",
        ema_rate: float = 0.05,
        init: str = "kmeans++",
        reseed_after: int = 100,
        seed: int | None = None,
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
