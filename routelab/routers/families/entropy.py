"""Entropy-driven presets: DynMoLE hybrid Tsallis routing and MAGNET two-stage weighting.

**DynMoLE** (Li et al. 2025, "DynMoLE: Boosting Mixture of LoRA Experts Fine-Tuning with
a Hybrid Routing Mechanism", arXiv 2504.00661; code ``mikecovlee/DynMoLE``,
``moe_peft/adapters/dynmole/model.py::_dynamic_routing``):

1. ``p = softmax(z)``; sort descending; keep the experts whose cumulative mass is
   ``<= top_p`` (stricter than An et al.'s rule), then force-keep the first
   ``keep_top_k``;
2. if the token's normalised Tsallis entropy ``S_q(p) / S_q(uniform)`` exceeds
   ``threshold``, activate every expert (soft routing for uncertain tokens);
3. gates are ``p`` at the active experts, not renormalised.

Loss: ``dyn_coef * mean_t S_q(p_t) + aux_coef * E * sum_e f_e P_e`` with ``f_e`` the mean
*masked* probability (not a count) and ``P_e`` the mean full probability. Defaults
(threshold 0.9, q 1.1, top_p 0.75, keep_top_k 2, aux 1e-3, dyn 1e-2) are the code's.
The Tsallis entropy is normalised by ``(1 - N^(1-q)) / (q - 1)`` (its value at the
uniform distribution), so the threshold lives in [0, 1].

**MAGNET** (arXiv 2602.20723) [abstract; the loss forms, trigger and ramp are recon]:
the routing entropy ``H_bar`` (mean normalised per-token entropy) is tracked as an EMA
once per optimizer step. Stage 1 (coverage) adds ``-lambda_1 * H(mean_t p_t)``
(rewarding balanced marginal use); the first time the EMA drops below ``trigger`` (or,
with ``patience > 0``, stops improving for ``patience`` steps) the loss switches, for
good, to stage 2 (specialisation) ``+lambda_2 * ramp * mean_t H(p_t)`` with ``ramp``
rising linearly to 1 over ``ramp_steps`` steps. The stage lives in a buffer and changes
only in ``end_of_step``.
"""

from __future__ import annotations

import math

import torch

from routelab.core.errors import ConfigError
from routelab.core.validation import check_choice, check_non_negative, check_positive_int, check_probability
from routelab.routers.families.dynamic import pack_mask
from routelab.routers.parts.assembly import assemble_router, softmax_gate_mode
from routelab.routers.parts.router import Router, RouterLoss, RoutingDraft, Selector, StatefulPart
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset

ENTROPY_KINDS = ("tsallis", "renyi", "shannon")


def tsallis_entropy(p_TE: torch.Tensor, q: float, *, eps: float = 0.0) -> torch.Tensor:
    """``S_q(p) = (1 - sum_e p_e^q) / (q - 1)`` per row (Shannon entropy in nats at ``q = 1``)."""
    p_TE = p_TE + eps
    if abs(q - 1.0) < 1e-12:
        return -(p_TE * p_TE.clamp_min(1e-30).log()).sum(dim=-1)
    return (1.0 - p_TE.pow(q).sum(dim=-1)) / (q - 1.0)


def renyi_entropy(p_TE: torch.Tensor, q: float, *, eps: float = 0.0) -> torch.Tensor:
    """``H_q(p) = log(sum_e p_e^q) / (1 - q)`` per row (Shannon at ``q = 1``)."""
    p_TE = p_TE + eps
    if abs(q - 1.0) < 1e-12:
        return -(p_TE * p_TE.clamp_min(1e-30).log()).sum(dim=-1)
    return p_TE.pow(q).sum(dim=-1).clamp_min(1e-30).log() / (1.0 - q)


def max_entropy(kind: str, q: float, num_experts: int) -> float:
    """The entropy of the uniform distribution over ``num_experts`` (the normaliser)."""
    if num_experts <= 1:
        return 1.0
    if kind == "tsallis" and abs(q - 1.0) >= 1e-12:
        return (1.0 - num_experts ** (1.0 - q)) / (q - 1.0)
    return math.log(num_experts)


def normalized_entropy(p_TE: torch.Tensor, kind: str = "tsallis", q: float = 1.1, *, eps: float = 0.0) -> torch.Tensor:
    """Per-row entropy divided by its uniform-distribution value (1 = uniform, 0 = one-hot)."""
    if kind == "tsallis":
        raw = tsallis_entropy(p_TE, q, eps=eps)
    elif kind == "renyi":
        raw = renyi_entropy(p_TE, q, eps=eps)
    else:
        raw = tsallis_entropy(p_TE, 1.0, eps=eps)
    return raw / max_entropy(kind, q, p_TE.shape[-1])


def dynmole_keep(sorted_p_TE: torch.Tensor, top_p: float, keep_top_k: int) -> torch.Tensor:
    """DynMoLE's top-p mask over descending-sorted probabilities: ``cumsum <= top_p``, plus
    the first ``keep_top_k`` ranks."""
    keep_TE = sorted_p_TE.cumsum(dim=-1) <= top_p
    keep_TE[:, :keep_top_k] = True
    return keep_TE


class DynMoLESelector(Selector):
    """DynMoLE hybrid routing (see module docstring).

    Args:
        num_experts: ``E``.
        keep_top_k: experts always kept (2).
        top_p: cumulative-mass threshold of the top-p part (0.75).
        threshold: normalised-entropy level above which a token uses every expert (0.9).
        entropy_index: ``q`` of the Tsallis (or Renyi) entropy (1.1).
        entropy_kind: ``tsallis`` (default), ``renyi`` or ``shannon``.
        eps: added to ``p`` inside the entropy (1e-5 in the code).
    """

    def __init__(
        self,
        num_experts: int,
        keep_top_k: int,
        *,
        top_p: float,
        threshold: float,
        entropy_index: float,
        entropy_kind: str,
        eps: float,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.keep_top_k = check_positive_int("top_k", keep_top_k)
        self.top_p = check_probability("top_p", top_p)
        self.threshold = float(threshold)
        if not (self.threshold > 0):
            raise ConfigError(f"entropy_threshold must be > 0, got {threshold} (values >= 1 disable soft routing).")
        self.entropy_index = float(entropy_index)
        if not self.entropy_index > 0:
            raise ConfigError(f"entropy_index (q) must be > 0, got {entropy_index}.")
        self.entropy_kind = check_choice("entropy_kind", entropy_kind, ENTROPY_KINDS)
        self.eps = check_non_negative("entropy_eps", eps)

    def extra_repr(self) -> str:
        return (
            f"keep_top_k={self.keep_top_k}, top_p={self.top_p}, threshold={self.threshold}, "
            f"q={self.entropy_index}, kind={self.entropy_kind!r}"
        )

    def entropy(self, p_TE: torch.Tensor) -> torch.Tensor:
        return normalized_entropy(p_TE, self.entropy_kind, self.entropy_index, eps=self.eps)

    def forward(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        assert draft.scores_TE is not None and draft.selection_scores_TE is not None
        p_TE = draft.scores_TE
        _, order_TE = torch.sort(draft.selection_scores_TE, dim=-1, descending=True, stable=True)
        keep_TE = dynmole_keep(p_TE.gather(1, order_TE), self.top_p, self.keep_top_k)
        entropy_T = self.entropy(p_TE)
        soft_T = entropy_T > self.threshold
        keep_TE = keep_TE | soft_T.unsqueeze(1)
        draft.extras["normalized_entropy_T"] = entropy_T
        rank_mask_TE = torch.zeros_like(keep_TE).scatter_(1, order_TE, keep_TE)
        draft.extras["dynmole_mask_TE"] = rank_mask_TE
        if draft.num_tokens:
            draft.extra_stats["soft_routed_fraction"] = soft_T.float().mean().detach()
        return pack_mask(order_TE, keep_TE, p_TE)


class DynMoLEEntropyLoss(RouterLoss):
    """``mean_t`` of the normalised Tsallis entropy the selector computed (DynMoLE's dyn loss)."""

    def __init__(self, coef: float, name: str = "dynmole_entropy") -> None:
        super().__init__(name, coef)

    def forward(self, draft: RoutingDraft) -> torch.Tensor:
        return draft.extras["normalized_entropy_T"].mean()


class DynMoLEBalanceLoss(RouterLoss):
    """``E * sum_e f_e P_e`` with ``f_e = mean_t`` masked probability, ``P_e = mean_t p_te``."""

    def __init__(self, coef: float, name: str = "dynmole_aux") -> None:
        super().__init__(name, coef)

    def forward(self, draft: RoutingDraft) -> torch.Tensor:
        p_TE = draft.probs_TE()
        f_E = (p_TE * draft.extras["dynmole_mask_TE"]).mean(dim=0)
        return draft.num_experts * (f_E * p_TE.mean(dim=0)).sum()


def shannon_normalized(p_TE: torch.Tensor) -> torch.Tensor:
    """Row-wise Shannon entropy divided by ``ln E``."""
    return normalized_entropy(p_TE, "shannon", 1.0)


class MagnetLoss(RouterLoss, StatefulPart):
    """MAGNET two-stage entropy-triggered weighting (see module docstring).

    The returned value already carries the active stage's weight (``lambda_1`` or the
    ramped ``lambda_2``), since which term is active is the state; its router coefficient
    is 1. ``Routing.stats`` gets ``magnet_stage`` and, after the first update,
    ``routing_entropy_ema``.

    Args:
        coverage_weight: ``lambda_1`` of stage 1.
        specialization_weight: ``lambda_2`` of stage 2 (reached after the ramp).
        trigger: stage 2 starts the first step the entropy EMA is below this (in [0, 1]).
        ema_decay: EMA factor ``beta`` (``ema <- beta * ema + (1 - beta) * H``).
        ramp_steps: steps over which stage 2's weight rises to ``lambda_2`` (0 = at once).
        patience: if > 0, also switch after this many steps without an EMA improvement of
            ``min_delta``.
    """

    def __init__(
        self,
        *,
        coverage_weight: float,
        specialization_weight: float,
        trigger: float,
        ema_decay: float,
        ramp_steps: int,
        patience: int,
        min_delta: float = 1e-3,
        name: str = "magnet",
    ) -> None:
        super().__init__(name, 1.0)
        self.coverage_weight = check_non_negative("coverage_weight", coverage_weight)
        self.specialization_weight = check_non_negative("specialization_weight", specialization_weight)
        self.trigger = check_probability("entropy_trigger", trigger)
        self.ema_decay = check_probability("entropy_ema_decay", ema_decay)
        if self.ema_decay >= 1.0:
            raise ConfigError("entropy_ema_decay must be < 1 (1 would never move the EMA).")
        self.ramp_steps = check_positive_int("ramp_steps", ramp_steps, minimum=0)
        self.patience = check_positive_int("patience", patience, minimum=0)
        self.min_delta = check_non_negative("min_delta", min_delta)
        self.register_buffer("stage", torch.ones((), dtype=torch.long))
        self.register_buffer("entropy_ema", torch.zeros(()))
        self.register_buffer("has_ema", torch.zeros((), dtype=torch.bool))
        self.register_buffer("best_ema", torch.full((), float("inf")))
        self.register_buffer("steps_without_improvement", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps_in_stage2", torch.zeros((), dtype=torch.long))
        self.register_buffer("pending_sum", torch.zeros(()), persistent=False)
        self.register_buffer("pending_count", torch.zeros(()), persistent=False)

    def stage2_weight(self) -> float:
        if self.ramp_steps == 0:
            return self.specialization_weight
        return self.specialization_weight * min(1.0, (int(self.steps_in_stage2) + 1) / self.ramp_steps)

    def forward(self, draft: RoutingDraft) -> torch.Tensor:
        p_TE = draft.probs_TE()
        token_entropy = shannon_normalized(p_TE).mean()
        if draft.training:
            with torch.no_grad():
                self.pending_sum += token_entropy.detach()
                self.pending_count += 1
        draft.extra_stats["magnet_stage"] = self.stage.detach().float()
        if bool(self.has_ema):
            draft.extra_stats["routing_entropy_ema"] = self.entropy_ema.detach().clone()
        if int(self.stage) == 1:
            marginal_entropy = shannon_normalized(p_TE.mean(dim=0, keepdim=True)).squeeze(0)
            return -self.coverage_weight * marginal_entropy
        return self.stage2_weight() * token_entropy

    def observe_entropy(self, value: float) -> None:
        """Record one forward's mean normalised token entropy (what ``forward`` does in training)."""
        self.pending_sum += float(value)
        self.pending_count += 1

    @torch.no_grad()
    def end_of_step(self) -> None:
        if float(self.pending_count) > 0:
            mean = self.pending_sum / self.pending_count
            if not bool(self.has_ema):
                self.entropy_ema.copy_(mean)
                self.has_ema.fill_(True)
            else:
                self.entropy_ema.mul_(self.ema_decay).add_((1.0 - self.ema_decay) * mean)
            self.pending_sum.zero_()
            self.pending_count.zero_()
            if float(self.entropy_ema) < float(self.best_ema) - self.min_delta:
                self.best_ema.copy_(self.entropy_ema)
                self.steps_without_improvement.zero_()
            else:
                self.steps_without_improvement += 1
        if int(self.stage) == 1:
            crossed = bool(self.has_ema) and float(self.entropy_ema) < self.trigger
            stalled = self.patience > 0 and int(self.steps_without_improvement) >= self.patience
            if crossed or stalled:
                self.stage.fill_(2)
        else:
            self.steps_in_stage2 += 1


@register_preset(
    "dynmole",
    description="top-p (cumsum <= 0.75) keeping at least top_k=2, all experts when normalised Tsallis entropy "
    "(q=1.1) > 0.9; raw-probability gates; entropy loss 1e-2 + masked balance loss 1e-3",
    paper="Li et al. 2025, DynMoLE: Boosting Mixture of LoRA Experts Fine-Tuning with a Hybrid Routing Mechanism "
    "(arXiv 2504.00661)",
    default_top_k=2,
    exemptions={"weights_sum_to_one": "gates are the raw softmax probabilities of the active experts (not renormalised)"},
)
def build_dynmole(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    top_p: float = 0.75,
    entropy_threshold: float = 0.9,
    entropy_index: float = 1.1,
    entropy_kind: str = "tsallis",
    entropy_eps: float = 1e-5,
    dynmole_entropy_coef: float = 1e-2,
    dynmole_aux_coef: float = 1e-3,
) -> Router:
    """DynMoLE hybrid routing: ``p = softmax(z)``; the experts whose sorted cumulative
    probability is ``<= top_p``, always at least the first ``top_k`` (DynMoLE's
    ``keep_top_k``); every expert for tokens whose normalised Tsallis entropy
    ``S_q(p) / S_q(uniform)`` (``q = entropy_index``) exceeds ``entropy_threshold``. Gates
    are ``p`` unnormalised. Losses: ``dynmole_entropy_coef * mean_t S_q`` (normalised) and
    ``dynmole_aux_coef * E * sum_e f_e P_e`` with ``f_e`` the mean masked probability.
    Defaults are those of the DynMoLE code (``mikecovlee/DynMoLE``).
    """
    extra_losses = [
        DynMoLEEntropyLoss(check_non_negative("dynmole_entropy_coef", dynmole_entropy_coef)),
        DynMoLEBalanceLoss(check_non_negative("dynmole_aux_coef", dynmole_aux_coef)),
    ]
    selector = DynMoLESelector(
        spec.num_experts,
        spec.top_k,
        top_p=top_p,
        threshold=entropy_threshold,
        entropy_index=entropy_index,
        entropy_kind=entropy_kind,
        eps=entropy_eps,
    )
    return assemble_router(spec, common, selector=selector, gate_mode="none", extra_losses=extra_losses)


@register_preset(
    "magnet",
    description="softmax top-k with a two-stage entropy loss: reward marginal entropy (coverage) until the routing "
    "entropy EMA falls below a trigger, then penalise per-token entropy (specialisation), one-way",
    paper="Dai, Fang & Cai 2026, MAGNET: Modality-Guided Mixture of Graph Experts with Entropy-Triggered Routing "
    "(arXiv 2602.20723)",
    default_top_k=2,
)
def build_magnet(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    coverage_weight: float = 1e-2,
    specialization_weight: float = 1e-2,
    entropy_trigger: float = 0.5,
    entropy_ema_decay: float = 0.9,
    ramp_steps: int = 1000,
    patience: int = 0,
    normalization: str = "auto",
) -> Router:
    """MAGNET entropy-triggered two-stage weighting [recon]: stage 1 adds
    ``-coverage_weight * H(mean_t p_t) / ln E``; after each optimizer step the EMA of
    ``mean_t H(p_t) / ln E`` is updated and, the first time it is below
    ``entropy_trigger`` (or has not improved for ``patience`` steps, when > 0), the loss
    switches for good to ``+specialization_weight * ramp * mean_t H(p_t) / ln E``
    (``ramp`` rising to 1 over ``ramp_steps``). Router: softmax top-k, renormalised for
    k > 1. The stage is a buffer, saved with the model.
    """
    magnet_loss = MagnetLoss(
        coverage_weight=coverage_weight,
        specialization_weight=specialization_weight,
        trigger=entropy_trigger,
        ema_decay=entropy_ema_decay,
        ramp_steps=ramp_steps,
        patience=patience,
    )
    return assemble_router(
        spec, common, gate_mode=softmax_gate_mode(normalization, spec.top_k), extra_losses=[magnet_loss]
    )
