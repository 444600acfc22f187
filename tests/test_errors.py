"""Every bad input gets a clear error that names the argument."""

from __future__ import annotations

import pytest
import torch

import routelab
from routelab.core.errors import ConfigError, InputError, RoutelabError


def layer(**kw):
    args = dict(d_model=8, d_hidden=8, num_experts=4, top_k=2, router="mixtral")
    args.update(kw)
    return routelab.MoE(**args)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"top_k": 5}, "top_k=5 is larger than num_experts=4"),
        ({"num_experts": 0}, "num_experts must be >= 1"),
        ({"num_experts": 2.5}, "num_experts must be an integer"),
        ({"d_model": 0}, "d_model must be >= 1"),
        ({"d_hidden": -3}, "d_hidden must be >= 1"),
        ({"capacity_factor": 0.0}, "capacity_factor must be > 0"),
        ({"capacity_factor": -1.0}, "capacity_factor must be > 0"),
        ({"drop_policy": "random"}, "drop_policy='random' must be one of"),
        ({"activation": "tanh"}, "activation='tanh' must be one of"),
        ({"dispatch": "fast"}, "dispatch='fast' must be one of"),
        ({"z_loss_coef": -1.0}, "z_loss_coef must be a finite number >= 0"),
        ({"router": "mixtrl"}, "Did you mean 'mixtral'"),
        ({"router": "mixtral", "z_los_coef": 1e-3}, "Did you mean 'z_loss_coef'"),
        ({"router": "mixtral", "top_k": 1, "normalization": "renorm"}, "normalization='renorm' with top_k=1"),
        ({"router": "topk", "normalization": "softmax"}, "normalization='softmax' must be one of"),
        ({"router": "deepseek-v3", "num_experts": 12, "num_groups": 5}, "num_groups=5 must divide num_experts=12"),
        ({"router": "hash", "hash_mode": "balanced"}, "needs vocab_size"),
        ({"shared_expert_gate": True}, "shared_expert_gate=True needs num_shared_experts >= 1"),
        ({"router": 3}, "router must be a preset name"),
    ],
)
def test_bad_configuration_is_refused_with_the_argument_named(kwargs, needle) -> None:
    with pytest.raises(ConfigError) as info:
        layer(**kwargs)
    assert needle in str(info.value)


def test_unknown_preset_error_lists_the_known_ones() -> None:
    with pytest.raises(routelab.routers.registry.ConfigError) as info:
        routelab.create_router("expert_choice", d_model=8, num_experts=4)
    message = str(info.value)
    assert "'expert-choice'" in message and "Known router presets" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("make_x", "needle"),
    [
        (lambda: torch.randn(4, 8), "must have shape [batch, seq, d_model]"),
        (lambda: torch.randn(2, 3, 7), "has width 7 but the layer was built with d_model=8"),
        (lambda: torch.ones(2, 3, 8, dtype=torch.long), "must be a floating tensor"),
        (lambda: torch.full((2, 3, 8), float("nan")), "contains 48 NaN/Inf values"),
        (lambda: torch.tensor([[[float("inf")] + [0.0] * 7]]), "contains 1 NaN/Inf values"),
        (lambda: [[0.0] * 8], "must be a torch.Tensor"),
    ],
)
def test_bad_activations_are_refused(make_x, needle) -> None:
    with pytest.raises(InputError) as info:
        layer()(make_x())
    assert needle in str(info.value)


def test_bad_masks_and_ids_are_refused() -> None:
    m = layer()
    x = torch.randn(2, 3, 8)
    with pytest.raises(InputError, match="padding_mask must be a bool tensor"):
        m(x, padding_mask=torch.ones(2, 3))
    with pytest.raises(InputError, match=r"padding_mask must have shape \[batch, seq\] = \[2, 3\]"):
        m(x, padding_mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(InputError, match="token_ids must be an integer tensor"):
        m(x, token_ids=torch.zeros(2, 3))
    with pytest.raises(InputError, match="negative ids"):
        m(x, token_ids=torch.full((2, 3), -1))


def test_hash_router_without_token_ids_says_what_to_pass() -> None:
    m = layer(router="hash", top_k=1)
    with pytest.raises(InputError, match="pass token_ids"):
        m(torch.randn(1, 3, 8))


def test_unfitted_balanced_hash_and_out_of_vocab_ids() -> None:
    m = layer(router="hash", top_k=1, hash_mode="balanced", vocab_size=10)
    with pytest.raises(ConfigError, match="not fitted"):
        m(torch.randn(1, 3, 8), token_ids=torch.zeros(1, 3, dtype=torch.long))
    m.router.selector.fit(torch.ones(10))
    with pytest.raises(InputError, match="vocab_size=10"):
        m(torch.randn(1, 3, 8), token_ids=torch.full((1, 3), 12))


def test_explicit_grouped_mm_with_unsupported_dtype_is_refused() -> None:
    m = layer(dispatch="grouped_mm").double()
    with pytest.raises(ConfigError, match="dispatch='grouped_mm' cannot run torch.float64"):
        m(torch.randn(1, 3, 8, dtype=torch.float64))
    # the automatic choice falls back to the loop and works in float64
    assert layer(dispatch="auto").double()(torch.randn(1, 3, 8, dtype=torch.float64)).y.dtype == torch.float64


def test_all_errors_share_one_base_class() -> None:
    assert issubclass(ConfigError, RoutelabError) and issubclass(InputError, RoutelabError)
    assert issubclass(RoutelabError, ValueError)


def test_a_built_router_cannot_take_extra_options() -> None:
    router = routelab.create_router("mixtral", d_model=8, num_experts=4)
    with pytest.raises(ConfigError, match="already built Router"):
        routelab.MoE(d_model=8, d_hidden=8, num_experts=4, router=router, z_loss_coef=1e-3)
    with pytest.raises(ConfigError, match="the router has 4 experts but num_experts=6"):
        routelab.MoE(d_model=8, d_hidden=8, num_experts=6, router=router)
