"""Router presets: named combinations of parts with the defaults of one paper.

``create_router(name, d_model=..., num_experts=..., top_k=..., **overrides)`` builds one;
``list_routers()`` lists them. A preset is a builder function registered with
``register_preset``; its keyword-only parameters are its specific options, and the
options every preset accepts live in ``CommonOptions``. Unknown options are rejected
with the closest valid names.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from routelab.core.errors import ConfigError, suggest
from routelab.core.registry import Registry
from routelab.core.validation import (
    check_capacity_factor,
    check_choice,
    check_non_negative,
    check_option_type,
    check_positive_int,
    check_top_k,
)
from routelab.routers.parts.capacity import DROP_POLICIES
from routelab.routers.parts.router import Router


@dataclass(frozen=True)
class RouterSpec:
    """The shape of a router: model width, number of experts, experts per token."""

    d_model: int
    num_experts: int
    top_k: int


@dataclass
class CommonOptions:
    """Options accepted by every preset (a preset may change their defaults).

    Attributes:
        aux_loss_coef: Switch/GShard balance loss coefficient (0 = off).
        seq_aux_loss_coef: sequence-level balance loss coefficient (0 = off).
        z_loss_coef: router z-loss coefficient (ST-MoE; 0 = off).
        jitter_eps: multiplicative input jitter in training (Switch; 0 = off).
        capacity_factor: token-dropping capacity factor; None = dropless. Expert-choice
            presets use it as their per-group capacity factor instead.
        drop_policy: ``probs``, ``position`` or ``choice_then_position`` (which assignments are
            kept under capacity; see ``routelab.routers.parts.capacity``).
        router_init_std: std of the router weight initialisation.
    """

    aux_loss_coef: float = 0.0
    seq_aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    jitter_eps: float = 0.0
    capacity_factor: float | None = None
    drop_policy: str = "probs"
    router_init_std: float = 0.02

    def validate(self) -> CommonOptions:
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "jitter_eps", "router_init_std"):
            check_non_negative(name, getattr(self, name))
        check_capacity_factor(self.capacity_factor)
        check_choice("drop_policy", self.drop_policy, DROP_POLICIES)
        return self


COMMON_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(CommonOptions))

Builder = Callable[..., Router]


@dataclass(frozen=True)
class PresetInfo:
    """A registered preset.

    Attributes:
        name, description, paper: shown by ``routelab list``.
        builder: ``builder(spec, common, **options) -> Router``.
        default_top_k: used when ``top_k`` is not given.
        common_defaults: this preset's defaults for ``CommonOptions`` fields.
        exemptions: router-agnostic properties that do not hold for this preset, each
            with the reason (keys: ``token_permutation`` — permuting positions within
            sequences and the order of sequences permutes the routing;
            ``padding_invariance`` — padding never changes real tokens' routing;
            ``capacity_factor`` — the preset honours a token-dropping capacity;
            ``weights_sum_to_one`` — why the gates need not sum to 1 (the test checks
            every router whose gate normalisation is ``renorm``)).
        min_top_k: the smallest ``top_k`` the preset accepts.
        needs_token_ids: the router reads ``token_ids`` instead of hidden states.
        needs_attention: the router reads the attention matrix (``attention=`` of the layer).
        layer_kind: the layer that runs the router: ``"token"`` (``routelab.MoE``) or
            ``"soft"`` (``routelab.SoftMoE``, slots mixed from tokens); ``routelab.moe_layer``
            picks it.
    """

    name: str
    description: str
    paper: str
    builder: Builder
    default_top_k: int = 2
    common_defaults: dict[str, Any] = field(default_factory=dict)
    exemptions: dict[str, str] = field(default_factory=dict)
    min_top_k: int = 1
    needs_token_ids: bool = False
    needs_attention: bool = False
    layer_kind: str = "token"

    def specific_options(self) -> dict[str, Any]:
        """The preset's own options and their defaults."""
        params = inspect.signature(self.builder).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def options(self) -> dict[str, Any]:
        """All accepted options (common and specific) with this preset's defaults."""
        common = dataclasses.asdict(CommonOptions(**self.common_defaults))
        return {**common, **self.specific_options()}


PRESETS: Registry[PresetInfo] = Registry("router preset", "router")


def register_preset(
    name: str,
    *,
    description: str,
    paper: str,
    default_top_k: int = 2,
    common_defaults: dict[str, Any] | None = None,
    exemptions: dict[str, str] | None = None,
    min_top_k: int = 1,
    needs_token_ids: bool = False,
    needs_attention: bool = False,
    layer_kind: str = "token",
) -> Callable[[Builder], Builder]:
    """Register ``builder(spec: RouterSpec, common: CommonOptions, **options) -> Router``."""

    def decorate(builder: Builder) -> Builder:
        PRESETS.add(
            name,
            PresetInfo(
                name=name,
                description=description,
                paper=paper,
                builder=builder,
                default_top_k=default_top_k,
                common_defaults=dict(common_defaults or {}),
                exemptions=dict(exemptions or {}),
                min_top_k=min_top_k,
                needs_token_ids=needs_token_ids,
                needs_attention=needs_attention,
                layer_kind=layer_kind,
            ),
        )
        return builder

    return decorate


def preset_info(name: str) -> PresetInfo:
    """The registered preset called ``name`` (suggests close names on a miss)."""
    return PRESETS.get(name)


def create_router(
    name: str,
    *,
    d_model: int,
    num_experts: int,
    top_k: int | None = None,
    **overrides: Any,
) -> Router:
    """Build the router preset ``name``.

    Args:
        name: a preset from ``list_routers()``.
        d_model: width of the hidden states routed.
        num_experts: number of routed experts ``E`` (>= 1).
        top_k: experts per token (defaults to the preset's own default, capped at ``E``).
        **overrides: options of ``CommonOptions`` or of the preset (see
            ``preset_info(name).options()``).
    """
    info = preset_info(name)
    d_model = check_positive_int("d_model", d_model)
    num_experts = check_positive_int("num_experts", num_experts)
    if top_k is None:
        top_k = min(info.default_top_k, num_experts)
    top_k = check_top_k(top_k, num_experts)
    if top_k < info.min_top_k:
        raise ConfigError(f"router {name!r} needs top_k >= {info.min_top_k}, got top_k={top_k}.")
    specific_names = info.specific_options()
    common_kwargs = dict(info.common_defaults)
    specific_kwargs: dict[str, Any] = {}
    defaults = info.options()
    for key, value in overrides.items():
        if key in defaults:
            check_option_type(f"router {name!r}", key, value, defaults[key])
        if key in COMMON_OPTION_NAMES:
            common_kwargs[key] = value
        elif key in specific_names:
            specific_kwargs[key] = value
        else:
            valid = sorted([*COMMON_OPTION_NAMES, *specific_names])
            raise ConfigError(
                f"router {name!r} has no option {key!r}.{suggest(key, valid)} Valid options: {', '.join(valid)}."
            )
    common = CommonOptions(**common_kwargs).validate()
    router = info.builder(RouterSpec(d_model, num_experts, top_k), common, **specific_kwargs)
    router.name = name
    router.d_model = d_model
    from routelab.routers.option_use import check_common_options_used

    preset_defaults = dataclasses.asdict(CommonOptions(**info.common_defaults))
    given = {key: value for key, value in overrides.items() if key in COMMON_OPTION_NAMES}
    check_common_options_used(name, router, given, preset_defaults)
    return router


def list_routers() -> list[dict[str, str]]:
    """Every preset as ``{"name", "description", "paper"}``, in registration order."""
    return [{"name": p.name, "description": p.description, "paper": p.paper} for p in PRESETS]
