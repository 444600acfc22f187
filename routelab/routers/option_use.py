"""Refuse common options that a built router would silently ignore.

Every preset accepts the ``CommonOptions``, but not every router has the part an option
acts on: a hashing router's scores depend on nothing a balance loss could train, an
expert-choice selector bounds its load itself so a drop policy has nothing to drop, a
cosine scorer does not take input jitter. ``check_common_options_used`` looks at the built
router and raises a ``ConfigError`` naming the option when it would do nothing.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from routelab.core.errors import ConfigError
from routelab.routers.parts.capacity import Capacity
from routelab.routers.parts.losses import SequenceBalanceLoss, SwitchBalanceLoss, ZLoss
from routelab.routers.parts.scorers import ConstantScorer

_LOSSES = {"aux_loss_coef": SwitchBalanceLoss, "seq_aux_loss_coef": SequenceBalanceLoss, "z_loss_coef": ZLoss}


def _constant_gates(router: nn.Module) -> bool:
    """Gates that do not depend on the token: ``1/k`` gates, or one renormalised gate (top-1)."""
    if getattr(getattr(router, "selector", None), "constant_gates", False):
        return True
    gate_norm = getattr(router, "gate_norm", None)
    if gate_norm is None:
        return False
    if type(gate_norm).__name__ == "UniformGate":
        return True
    return getattr(gate_norm, "mode", None) == "renorm" and getattr(router, "top_k", 0) == 1


def _unused_reason(option: str, value: Any, router: nn.Module) -> str | None:
    modules = list(router.modules())
    if option == "jitter_eps":
        if not any(getattr(m, "jitter_eps", None) == value for m in modules):
            return "its scorer does not apply input jitter"
    elif option == "router_init_std":
        if not any(getattr(m, "init_std", None) == value for m in modules):
            return "its scorer is not initialised from a normal distribution with this std"
    elif option == "drop_policy":
        if not isinstance(getattr(router, "capacity", None), Capacity):
            return "it has no token-dropping capacity stage (set capacity_factor, where the preset drops by capacity)"
        if _constant_gates(router):
            return "its gates are the same for every assignment, so every policy keeps the earliest tokens"
    elif option in _LOSSES:
        losses = getattr(router, "losses", ())
        if not any(isinstance(loss, _LOSSES[option]) for loss in losses):
            return "the preset does not build this loss"
        if isinstance(getattr(router, "scorer", None), ConstantScorer):
            return "its scores depend on neither the input nor a weight, so the loss has no gradient"
    return None


def check_common_options_used(name: str, router: nn.Module, given: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Raise ``ConfigError`` for a common option in ``given`` that differs from the preset's
    default (``defaults``) and that ``router`` does not use."""
    for option, value in given.items():
        if option not in defaults or value == defaults[option]:
            continue
        if option in ("jitter_eps", *_LOSSES) and not value:  # switching a part off is always allowed
            continue
        reason = _unused_reason(option, value, router)
        if reason is not None:
            raise ConfigError(f"router {name!r} would ignore {option}={value!r}: {reason}. Leave {option} out.")



