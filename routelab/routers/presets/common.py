"""Building blocks shared by the presets: standard losses, capacity, gate normalisation."""

from __future__ import annotations

from routelab.core.errors import ConfigError
from routelab.core.validation import check_choice
from routelab.routers.base import RouterLoss
from routelab.routers.capacity import Capacity
from routelab.routers.losses import SequenceBalanceLoss, SwitchBalanceLoss, ZLoss
from routelab.routers.registry import CommonOptions, RouterSpec
from routelab.routers.scorers import LinearScorer

# Gate normalisations of spec §1 (names as in the spec), with what they mean in parts.
NORMALIZATIONS = ("pre_softmax_norenorm", "renorm", "sigmoid_norm")


def standard_losses(common: CommonOptions) -> list[RouterLoss]:
    """The Switch, sequence-level and z losses whose coefficients are non-zero."""
    losses: list[RouterLoss] = []
    if common.aux_loss_coef:
        losses.append(SwitchBalanceLoss(common.aux_loss_coef))
    if common.seq_aux_loss_coef:
        losses.append(SequenceBalanceLoss(common.seq_aux_loss_coef))
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
            "(spec §1). Use normalization='pre_softmax_norenorm' (or the 'switch' preset) for top-1."
        )
    return "renorm" if normalization == "renorm" else "none"
