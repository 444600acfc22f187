"""Dynamic-k presets: top-p routing (An et al. 2024) and DynaMoE (Gülmez 2026).

Dynamic-k selectors: each token takes as many experts as it needs.

* ``TopPSelector`` — Huang, An et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in
  MoE Models" (arXiv 2403.07652; code ``ZhenweiAn/Dynamic_MoE``,
  ``top_p_sampling_batched_all_sequence``): sort ``p = softmax(z)`` descending, keep every
  expert up to *and including* the first one at which the cumulative probability exceeds
  ``P`` — the smallest prefix whose mass is ``> P`` (all experts when none exceeds it).
  Gates are the raw ``p``, not renormalised.
* ``PercentileSelector`` — DynaMoE (Gülmez 2026, arXiv 2603.01697), "percentile-thresholded
  gating": expert e is active for token t when ``p_te >= tau``, ``tau`` the ``q``-quantile
  (linear interpolation, as ``torch.quantile``) of the probabilities of the whole batch (``scope='batch'``, our reading of the paper) or
  of each token (``scope='token'``) [recon]; the count is clamped to ``[1, K_l]``
  keeping the most probable experts.
* ``EntropyLoss`` — the dynamic loss of An et al.: ``mean_t -sum_e p_te log p_te``; it
  keeps the router from flattening ``p`` to buy more experts.

Both selectors return ``K`` slots equal to the largest number of experts any token of the
batch takes, with ``-1`` in unused slots.

Layer-wise expert budgets: how many experts (or how much capacity) each layer gets.

DynaMoE (Gülmez 2026, "DynaMoE: Dynamic Token-Level Expert Activation with Layer-Wise
Adaptive Capacity", arXiv 2603.01697) gives every layer its own maximum number of active
experts ``K_l`` following one of six schedules over the depth position
``x = l / (L - 1)`` (``x = 0`` for a single layer):

* ``uniform``:          ``high`` everywhere;
* ``descending``:       linear from ``high`` (first layer) to ``low`` (last);
* ``ascending``:        linear from ``low`` to ``high``;
* ``pyramid``:          ``low`` at both ends, ``high`` at mid-depth (a tent);
* ``inverse-pyramid``:  ``high`` at both ends, ``low`` at mid-depth;
* ``wave``:             ``low + (high - low) * (1 + sin(2 pi c x)) / 2`` with ``c`` cycles.

The paper names uniform, descending, ascending, pyramid and wave; the sixth schedule
(inverse pyramid) and the exact shapes of pyramid and wave are a reconstruction [recon].

Use ``layer_top_k`` for integer ``k`` per layer (rounded half up, clamped to
``[low, high]``) and ``layer_capacity_factors`` for float capacity factors, e.g.::

    ks = layer_top_k("descending", num_layers=4, k_min=1, k_max=4)   # [4, 3, 2, 1]
    layers = [routelab.MoE(..., router="dynamoe", top_k=k) for k in ks]
"""

from __future__ import annotations

import math

import torch

from routelab.core.errors import ConfigError
from routelab.core.validation import check_choice, check_non_negative, check_positive_int, check_probability
from routelab.routers.parts.assembly import assemble_router
from routelab.routers.parts.router import Router, RouterLoss, RoutingDraft, Selector
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset

def pack_mask(order_TE: torch.Tensor, keep_TE: torch.Tensor, gate_source_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a per-rank keep mask into ``(topk_idx_TK, gate_TK)``.

    ``order_TE[t, r]`` is the expert at rank ``r`` for token t and ``keep_TE[t, r]`` says
    whether it is kept; kept ranks must form a prefix. ``K`` is the largest kept count.
    """
    num_tokens = order_TE.shape[0]
    if num_tokens == 0:
        empty = order_TE.new_empty(0, 1)
        return empty, gate_source_TE.new_empty(0, 1)
    k_max = max(int(keep_TE.sum(dim=1).max()), 1)
    idx_TK = torch.where(keep_TE[:, :k_max], order_TE[:, :k_max], torch.full_like(order_TE[:, :k_max], -1))
    gate_TK = gate_source_TE.gather(1, idx_TK.clamp_min(0))
    return idx_TK, torch.where(idx_TK >= 0, gate_TK, torch.zeros_like(gate_TK))


def top_p_keep(sorted_p_TE: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep mask over descending-sorted probabilities: rank r is kept iff the mass of the
    ranks before it is ``<= threshold`` (so the first rank whose cumulative mass exceeds
    the threshold is included, and rank 0 always is)."""
    cum_TE = sorted_p_TE.cumsum(dim=-1)
    before_TE = torch.cat([torch.zeros_like(cum_TE[:, :1]), cum_TE[:, :-1]], dim=-1)
    return before_TE <= threshold


class TopPSelector(Selector):
    """Top-p routing of An et al. 2024 (see module docstring).

    Args:
        num_experts: ``E``.
        threshold: ``P`` in (0, 1] (0.4 in the official config).
        max_k: optional cap on experts per token (None = up to ``E``).
    """

    def __init__(self, num_experts: int, threshold: float = 0.4, max_k: int | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.threshold = check_probability("top_p", threshold, open_low=True)
        if max_k is not None:
            check_positive_int("max_experts", max_k)
            if max_k > num_experts:
                raise ConfigError(f"max_experts={max_k} is larger than num_experts={num_experts}.")
        self.max_k = max_k

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, max_k={self.max_k}"

    def forward(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        assert draft.scores_TE is not None and draft.selection_scores_TE is not None
        _, order_TE = torch.sort(draft.selection_scores_TE, dim=-1, descending=True, stable=True)
        sorted_p_TE = draft.scores_TE.gather(1, order_TE)
        keep_TE = top_p_keep(sorted_p_TE, self.threshold)
        if self.max_k is not None:
            keep_TE[:, self.max_k :] = False
        return pack_mask(order_TE, keep_TE, draft.scores_TE)


PERCENTILE_SCOPES = ("batch", "token")


def linear_quantile(values_TE: torch.Tensor, q: float) -> torch.Tensor:
    """Row-wise ``q``-quantile with linear interpolation (``torch.quantile``'s default), ``[T, 1]``.

    Built on ``kthvalue`` so that it has no input-size limit.
    """
    n = values_TE.shape[1]
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    low = values_TE.kthvalue(lo + 1, dim=1, keepdim=True).values
    if hi == lo or pos == lo:
        return low
    high = values_TE.kthvalue(hi + 1, dim=1, keepdim=True).values
    return low + (high - low) * (pos - lo)


class PercentileSelector(Selector):
    """DynaMoE percentile-thresholded gating (see module docstring).

    Args:
        num_experts: ``E``.
        max_k: ``K_l``, this layer's maximum experts per token (>= 1).
        percentile: ``q`` in [0, 1); experts with ``p >= quantile_q(p)`` are active.
        scope: ``batch`` (one threshold over all tokens of the batch) or ``token``.
    """

    def __init__(self, num_experts: int, max_k: int, percentile: float = 0.9, scope: str = "batch") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.max_k = check_positive_int("top_k", max_k)
        self.percentile = check_probability("percentile", percentile)
        if self.percentile >= 1.0:
            raise ConfigError("percentile must be < 1 (1.0 would activate only the single largest probability).")
        self.scope = check_choice("percentile_scope", scope, PERCENTILE_SCOPES)

    def extra_repr(self) -> str:
        return f"max_k={self.max_k}, percentile={self.percentile}, scope={self.scope!r}"

    def threshold(self, p_TE: torch.Tensor) -> torch.Tensor:
        """``tau``: a scalar (batch scope) or ``[T, 1]`` (token scope)."""
        if self.scope == "batch":
            return linear_quantile(p_TE.reshape(1, -1), self.percentile).reshape(())
        return linear_quantile(p_TE, self.percentile)

    def forward(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        assert draft.scores_TE is not None and draft.selection_scores_TE is not None
        p_TE = draft.scores_TE
        _, order_TE = torch.sort(draft.selection_scores_TE, dim=-1, descending=True, stable=True)
        if draft.num_tokens == 0:
            return pack_mask(order_TE, torch.zeros_like(order_TE, dtype=torch.bool), p_TE)
        tau = self.threshold(p_TE)
        active_T = (p_TE >= tau).sum(dim=1).clamp(1, self.max_k)
        ranks_E = torch.arange(self.num_experts, device=p_TE.device)
        keep_TE = ranks_E.unsqueeze(0) < active_T.unsqueeze(1)
        draft.extra_stats["percentile_threshold"] = tau.detach().float().mean()
        return pack_mask(order_TE, keep_TE, p_TE)


class EntropyLoss(RouterLoss):
    """``mean_t H(p_t)`` with ``H`` the Shannon entropy in nats (An et al.'s dynamic loss)."""

    def __init__(self, coef: float, name: str = "dynamic_entropy") -> None:
        super().__init__(name, coef)

    def forward(self, draft: RoutingDraft) -> torch.Tensor:
        p_TE = draft.probs_TE()
        plogp_TE = torch.where(p_TE > 0, p_TE * p_TE.clamp_min(1e-30).log(), torch.zeros_like(p_TE))
        return -plogp_TE.sum(dim=-1).mean()


SCHEDULES = ("uniform", "descending", "ascending", "pyramid", "inverse-pyramid", "wave")


def schedule_fraction(schedule: str, depth: float, *, wave_cycles: float = 1.0) -> float:
    """Where layer depth ``depth`` in [0, 1] sits between ``low`` (0) and ``high`` (1)."""
    check_choice("schedule", schedule, SCHEDULES)
    if schedule == "uniform":
        return 1.0
    if schedule == "descending":
        return 1.0 - depth
    if schedule == "ascending":
        return depth
    tent = 1.0 - abs(2.0 * depth - 1.0)
    if schedule == "pyramid":
        return tent
    if schedule == "inverse-pyramid":
        return 1.0 - tent
    return (1.0 + math.sin(2.0 * math.pi * wave_cycles * depth)) / 2.0


def layer_schedule(schedule: str, num_layers: int, low: float, high: float, *, wave_cycles: float = 1.0) -> list[float]:
    """The raw (float) budget of each of ``num_layers`` layers between ``low`` and ``high``."""
    num_layers = check_positive_int("num_layers", num_layers)
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ConfigError(f"the schedule needs finite low <= high, got low={low}, high={high}.")
    if not math.isfinite(float(wave_cycles)):
        raise ConfigError(f"wave_cycles must be finite, got {wave_cycles}.")
    values = []
    for layer in range(num_layers):
        depth = layer / (num_layers - 1) if num_layers > 1 else 0.0
        values.append(low + (high - low) * schedule_fraction(schedule, depth, wave_cycles=wave_cycles))
    return values


def layer_top_k(schedule: str, num_layers: int, k_min: int, k_max: int, *, wave_cycles: float = 1.0) -> list[int]:
    """Experts per token ``K_l`` for each layer: the schedule rounded half up, in ``[k_min, k_max]``.

    Example: ``layer_top_k("descending", 4, 1, 4) == [4, 3, 2, 1]``.
    """
    k_min = check_positive_int("k_min", k_min)
    k_max = check_positive_int("k_max", k_max)
    if k_min > k_max:
        raise ConfigError(f"k_min={k_min} must be <= k_max={k_max}.")
    values = layer_schedule(schedule, num_layers, k_min, k_max, wave_cycles=wave_cycles)
    return [min(k_max, max(k_min, math.floor(v + 0.5))) for v in values]


def layer_capacity_factors(
    schedule: str, num_layers: int, low: float, high: float, *, wave_cycles: float = 1.0
) -> list[float]:
    """A capacity factor per layer (floats, for ``capacity_factor=``), following ``schedule``."""
    if not float(low) > 0:
        raise ConfigError(f"capacity factors must be > 0, got low={low}.")
    return layer_schedule(schedule, num_layers, low, high, wave_cycles=wave_cycles)


_RAW_GATES = "gates are raw softmax probabilities of the kept experts (not renormalised), as in the paper"


@register_preset(
    "top-p",
    description="dynamic-k: keep experts until their cumulative probability exceeds P (0.4); raw-probability gates; "
    "entropy (dynamic) loss 1e-4 + Switch loss 1e-2",
    paper="Huang, An et al. 2024, Harder Tasks Need More Experts: Dynamic Routing in MoE Models (arXiv 2403.07652, ACL 2024)",
    default_top_k=2,
    common_defaults={"aux_loss_coef": 1e-2},
    exemptions={"weights_sum_to_one": _RAW_GATES},
)
def build_top_p(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    top_p: float = 0.4,
    dynamic_loss_coef: float = 1e-4,
    max_experts: int | None = None,
) -> Router:
    """Top-p routing of "Harder Tasks Need More Experts": ``p = softmax(z)`` sorted
    descending; every expert up to and including the first whose cumulative probability
    exceeds ``top_p`` is used (at least one, at most ``max_experts`` when set). Gates are
    the raw ``p``. Losses: the dynamic loss ``mean_t H(p_t)`` (``dynamic_loss_coef``; the
    coefficients 1e-4 / 1e-2 are unverified) and the Switch balance loss
    (``aux_loss_coef``). ``top_k`` is only the nominal k of ``capacity_factor``.
    """
    entropy_loss = EntropyLoss(check_non_negative("dynamic_loss_coef", dynamic_loss_coef))
    return assemble_router(
        spec,
        common,
        selector=TopPSelector(spec.num_experts, top_p, max_experts),
        gate_mode="none",
        extra_losses=[entropy_loss],
    )


@register_preset(
    "dynamoe",
    description="dynamic-k: experts with p >= the batch's q-quantile (0.9) of probabilities, 1..top_k per token; "
    "per-layer top_k from routelab.routers.families.dynamic.layer_top_k",
    paper="Gülmez 2026, DynaMoE: Dynamic Token-Level Expert Activation with Layer-Wise Adaptive Capacity "
    "(arXiv 2603.01697)",
    default_top_k=2,
    common_defaults={"aux_loss_coef": 1e-2},
)
def build_dynamoe(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    percentile: float = 0.9,
    percentile_scope: str = "batch",
    normalization: str = "renorm",
) -> Router:
    """DynaMoE percentile-thresholded gating [recon]: ``tau`` is the ``percentile``
    quantile of all router probabilities of the batch (``percentile_scope='token'``: of
    each token's); a token uses the experts with ``p >= tau``, at least 1 and at most
    ``top_k`` (= the layer's ``K_l``; give each layer its own with
    ``routelab.routers.families.dynamic.layer_top_k``). Gates are renormalised over the used
    experts (``normalization='none'`` keeps raw probabilities) [recon]. Switch balance
    loss 1e-2 [recon].
    """
    check_choice("normalization", normalization, ("renorm", "none"))
    return assemble_router(
        spec,
        common,
        selector=PercentileSelector(spec.num_experts, spec.top_k, percentile, percentile_scope),
        gate_mode=normalization,
    )
