"""Building blocks shared by the presets: standard losses, capacity, gate normalisation,
and ``assemble_router``, which fills in the parts most presets share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from routelab.core.errors import ConfigError
from routelab.core.validation import check_choice
from routelab.routers.parts.router import Balancer, Router, RouterLoss, ScoreFunction, Scorer, Selector
from routelab.routers.parts.capacity import Capacity
from routelab.routers.parts.gates import GateNorm
from routelab.routers.parts.losses import SequenceBalanceLoss, SwitchBalanceLoss, ZLoss
from routelab.routers.registry import CommonOptions, RouterSpec
from routelab.routers.parts.score_functions import Softmax
from routelab.routers.parts.scorers import LinearScorer
from routelab.routers.parts.selectors import TopK

# The three gate normalisations of Megatron-Core's router (pre-softmax top-k without renormalisation,
# softmax then top-k renormalised, sigmoid then renormalised), by the names presets use.
NORMALIZATIONS = ("pre_softmax_norenorm", "renorm", "sigmoid_norm")


def standard_losses(common: CommonOptions, loss_counts: str = "selection") -> list[RouterLoss]:
    """The Switch, sequence-level and z losses whose coefficients are non-zero; the balance
    losses count ``loss_counts`` (``routelab.routers.parts.losses.LOSS_COUNTS``)."""
    losses: list[RouterLoss] = []
    if common.aux_loss_coef:
        losses.append(SwitchBalanceLoss(common.aux_loss_coef, counts=loss_counts))
    if common.seq_aux_loss_coef:
        losses.append(SequenceBalanceLoss(common.seq_aux_loss_coef, counts=loss_counts))
    if common.z_loss_coef:
        losses.append(ZLoss(common.z_loss_coef))
    return losses


def capacity_stage(common: CommonOptions) -> Capacity | None:
    """A token-dropping stage when ``capacity_factor`` is set, else None (dropless)."""
    if common.capacity_factor is None:
        return None
    return Capacity(common.capacity_factor, common.drop_policy)


def linear_scorer(spec: RouterSpec, common: CommonOptions) -> LinearScorer:
    return LinearScorer(spec.d_model, spec.num_experts, init_std=common.router_init_std, jitter_eps=common.jitter_eps)


def softmax_gate_mode(normalization: str, top_k: int, argument: str = "normalization") -> str:
    """``renorm`` or ``none`` for softmax scores; refuses renormalised top-1 (constant gates)."""
    if normalization == "auto":
        return "renorm" if top_k > 1 else "none"
    check_choice(argument, normalization, ("auto", "renorm", "pre_softmax_norenorm"))
    if normalization == "renorm" and top_k == 1:
        raise ConfigError(
            f"{argument}='renorm' with top_k=1 makes every gate exactly 1, so the router gets no gradient "
            "(Fedus et al. 2021 route top-1 without renormalising). Use normalization='pre_softmax_norenorm' (or the 'switch' preset) for top-1."
        )
    return "renorm" if normalization == "renorm" else "none"


def sigmoid_gate_mode(top_k: int) -> str:
    """``renorm`` for sigmoid scores at ``top_k > 1``; ``none`` at top-1, where one renormalised
    gate would be a constant (Megatron-Core keeps ``sigmoid(z)`` there)."""
    return "renorm" if top_k > 1 else "none"


# Default of ``assemble_router(capacity=...)``: build the stage from the common options
# (None stays a real choice: no capacity stage).
_FROM_COMMON: Any = object()


def assemble_router(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    scorer: Scorer | None = None,
    score_fn: ScoreFunction | None = None,
    selector: Selector | None = None,
    gate_mode: str = "renorm",
    scaling_factor: float = 1.0,
    gate_norm: nn.Module | None = None,
    balancer: Balancer | None = None,
    extra_losses: Sequence[RouterLoss] = (),
    capacity: nn.Module | None = _FROM_COMMON,
    loss_counts: str = "selection",
) -> Router:
    """A ``Router`` whose unspecified parts are the common ones: the linear scorer of
    ``common``, ``Softmax``, ``TopK(E, k)``, ``GateNorm(gate_mode, scaling_factor)``,
    ``standard_losses(common)`` followed by ``extra_losses``, and ``capacity_stage(common)``.

    ``gate_norm`` replaces the ``GateNorm`` stage; ``capacity=None`` builds no capacity
    stage (for selectors that bound the load themselves); ``loss_counts`` is what the
    standard balance losses count.
    """
    return Router(
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        scorer=linear_scorer(spec, common) if scorer is None else scorer,
        score_fn=Softmax() if score_fn is None else score_fn,
        selector=TopK(spec.num_experts, spec.top_k) if selector is None else selector,
        gate_norm=GateNorm(gate_mode, scaling_factor) if gate_norm is None else gate_norm,
        balancer=balancer,
        losses=[*standard_losses(common, loss_counts), *extra_losses],
        capacity=capacity_stage(common) if capacity is _FROM_COMMON else capacity,
    )
