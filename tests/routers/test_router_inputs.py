"""A router called on its own checks its input like the MoE layer does, for every preset;
option values of the wrong type are refused naming the option."""

from __future__ import annotations

import pytest
import torch

import routelab
from routelab.core.errors import ConfigError, InputError

PRESETS = [entry["name"] for entry in routelab.list_routers()]
D_MODEL = 8

BAD_INPUTS = {
    "nan": (torch.full((5, D_MODEL), float("nan")), "NaN/Inf"),
    "inf": (torch.cat([torch.randn(4, D_MODEL), torch.full((1, D_MODEL), float("inf"))]), "NaN/Inf"),
    "3-D": (torch.randn(2, 3, D_MODEL), "2 dimensions"),
    "int": (torch.ones(5, D_MODEL, dtype=torch.long), "floating"),
    "width": (torch.randn(5, D_MODEL + 1), f"d_model={D_MODEL}"),
    "not a tensor": ([[0.0] * D_MODEL], "torch.Tensor"),
}


@pytest.mark.parametrize("name", PRESETS)
def test_standalone_router_refuses_bad_input(name):
    router = routelab.create_router(name, d_model=D_MODEL, num_experts=4)
    for label, (x, message) in BAD_INPUTS.items():
        with pytest.raises(InputError, match=message):
            router(x)
        router.train()
        with pytest.raises(InputError, match=message):
            router(x)
        router.eval()


def test_standalone_router_routes_good_input_and_the_layer_checks_once():
    router = routelab.create_router("mixtral", d_model=D_MODEL, num_experts=4, top_k=2)
    routing = router(torch.randn(5, D_MODEL))
    assert routing.topk_idx.shape == (5, 2) and torch.isfinite(routing.topk_weight).all()
    layer = routelab.MoE(d_model=D_MODEL, d_hidden=16, num_experts=4, top_k=2, check_inputs=False)
    x = torch.randn(2, 3, D_MODEL)
    x[0, 0, 0] = float("nan")
    layer(x)  # the layer was told not to scan for NaN; its router does not scan again
    with pytest.raises(InputError, match="NaN/Inf"):
        routelab.MoE(d_model=D_MODEL, d_hidden=16, num_experts=4, top_k=2)(x)


@pytest.mark.parametrize(
    ("option", "value"),
    [("aux_loss_coef", "big"), ("z_loss_coef", True), ("capacity_factor", "1.25"), ("drop_policy", 3),
     ("normalization", 1.0)],
)
def test_option_of_the_wrong_type_is_named(option, value):
    with pytest.raises(ConfigError, match=f"{option}(=| must)"):
        routelab.create_router("mixtral", d_model=D_MODEL, num_experts=4, **{option: value})


def test_non_finite_count_matches_the_elementwise_count():
    from routelab.core.validation import non_finite_count

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for bad in (0, 1, 7):
            x = torch.randn(64, 16, generator=generator).to(dtype)
            where = torch.randperm(x.numel(), generator=generator)[:bad]
            x.view(-1)[where] = torch.tensor([float("nan"), float("inf"), -float("inf")] * 3)[:bad].to(dtype)
            assert non_finite_count(x) == int((~torch.isfinite(x)).sum()) == bad
    huge = torch.full((4, 4), 3e38)  # finite, but its sum overflows to inf
    assert non_finite_count(huge) == 0
