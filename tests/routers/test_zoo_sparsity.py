"""MoE-X sparsity-aware routing (Yang et al. 2025) and ReLU experts."""

from __future__ import annotations

import pytest
import torch

import routelab
from routelab.moe.dispatch import dispatch_combine
from routelab.moe.experts import BatchedExperts
from routelab.routers.families.sparsity import expected_active_fraction
from tests.reference import reference_moe


@pytest.mark.parametrize("stats", ["per-expert", "per-input"])
def test_estimated_active_fraction_matches_the_empirical_one(stats: str) -> None:
    # oracle setting (the paper's): W ~ N(0.01, 0.05^2), D = 1024 hidden, d = 256 inputs, x ~ N(0.2, 1)
    g = torch.Generator().manual_seed(0)
    w_EDH = torch.randn(1, 256, 1024, generator=g) * 0.05 + 0.01
    x_TD = torch.randn(16, 256, generator=g) + 0.2
    empirical = ((x_TD @ w_EDH[0]) > 0).float().mean(dim=1)
    estimate = expected_active_fraction(x_TD, w_EDH, stats)[:, 0]
    assert float((estimate - empirical).abs().max()) <= 0.05
    assert 0.6 < float(estimate.mean()) < 0.9  # ~0.8 active for this mean shift


def test_router_prefers_the_sparsest_experts() -> None:
    torch.manual_seed(0)
    layer = routelab.MoE(d_model=16, d_hidden=32, num_experts=4, top_k=2, router="moe-x", activation="relu")
    with torch.no_grad():
        for e, shift in enumerate([0.3, -0.3, 0.0, -0.6]):
            layer.experts.w_in_EDH[e] = torch.randn(16, 32) * 0.05 + shift * 0.05
    x = torch.randn(1, 20, 16).abs() + 0.1  # positive inputs: a negative weight mean means sparse activations
    routing = layer(x).routing
    assert all(set(row) == {1, 3} for row in routing.topk_idx.tolist())
    rho = expected_active_fraction(x[0], layer.experts.gate_projection().float())
    actual = ((x[0] @ layer.experts.w_in_EDH.detach()) > 0).float().mean(dim=-1).T
    assert torch.equal(rho.argsort(dim=1)[:, :2].sort(dim=1).values, actual.argsort(dim=1)[:, :2].sort(dim=1).values)


def test_moe_x_gradient_reaches_the_expert_encoders_and_gates_renormalise() -> None:
    torch.manual_seed(0)
    layer = routelab.MoE(d_model=8, d_hidden=12, num_experts=4, router="moe-x", activation="relu")
    out = layer(torch.randn(2, 5, 8))
    torch.testing.assert_close(out.routing.topk_weight.sum(dim=1), torch.ones(10))
    out.routing.topk_weight[:, 0].sum().backward()
    assert float(layer.experts.w_in_EDH.grad.abs().sum()) > 0


def test_relu_experts_match_the_reference() -> None:
    torch.manual_seed(0)
    experts = BatchedExperts(3, 6, 5, activation="relu")
    x = torch.randn(7, 6)
    idx = torch.randint(0, 3, (7, 2))
    w = torch.rand(7, 2)
    layer = routelab.MoE(d_model=6, d_hidden=5, num_experts=3, router="mixtral", activation="relu")
    torch.testing.assert_close(dispatch_combine(x, idx, w, experts), reference_moe(x, idx, w, experts))
    assert layer.experts.activation == "relu"


def test_bad_options_are_refused() -> None:
    with pytest.raises(routelab.ConfigError, match="moex_stats"):
        routelab.create_router("moe-x", d_model=8, num_experts=4, moex_stats="per-row")
    with pytest.raises(routelab.ConfigError, match="moex_score"):
        routelab.create_router("moe-x", d_model=8, num_experts=4, moex_score="exp")
    with pytest.raises(routelab.ConfigError, match="moex_temperature"):
        routelab.create_router("moe-x", d_model=8, num_experts=4, moex_temperature=0.0)
    with pytest.raises(routelab.ConfigError, match="activation"):
        routelab.MoE(d_model=8, d_hidden=8, num_experts=4, router="moe-x", activation="tanh")
    with pytest.raises(routelab.ConfigError, match="attach"):
        routelab.create_router("moe-x", d_model=8, num_experts=4)(torch.randn(2, 8))
