"""Expert-router coupling loss (Lv et al. 2025) and the expert-access hook."""

from __future__ import annotations

import math

import pytest
import torch

import routelab
from routelab.moe.experts import BatchedExperts
from routelab.routers.families.coupling import erc_activation_matrix, erc_loss_from_matrix, erc_noise_bound
from routelab.routers.parts.expert_access import attach_experts


def test_noise_bound_oracle() -> None:
    torch.testing.assert_close(erc_noise_bound(torch.eye(2)), torch.full((2,), math.sqrt(2) / 2))
    # rows at distances 1 and 3 from the middle row of norm 2
    r = torch.tensor([[1.0, 0.0], [2.0, 0.0], [5.0, 0.0]])
    torch.testing.assert_close(erc_noise_bound(r), torch.tensor([1 / 2, 1 / 4, 3 / 10]))


def test_loss_is_exactly_zero_when_each_expert_reads_only_its_own_router_row() -> None:
    num_experts, hidden = 4, 3
    experts = BatchedExperts(num_experts, d_model=num_experts, d_hidden=hidden, activation="gelu")
    with torch.no_grad():
        for j in range(num_experts):  # every column of W_g^j is R_j = e_j
            experts.w_in_EDH[j] = torch.eye(num_experts)[:, j : j + 1].expand(num_experts, hidden)
    router = routelab.create_router("erc", d_model=num_experts, num_experts=num_experts, top_k=2)
    router.scorer.weight.data.copy_(torch.eye(num_experts))
    attach_experts(router, experts)
    for alpha in (0.0, 0.5, 1.0):
        router.losses[-1].alpha = alpha
        router.train()
        assert float(router(torch.randn(10, num_experts)).losses["erc"].detach()) == 0.0
    m = erc_activation_matrix(torch.eye(num_experts), experts.gate_projection())
    assert torch.equal(m - torch.diag(m.diagonal()), torch.zeros(num_experts, num_experts))


def test_loss_matches_the_hand_computed_hinges() -> None:
    m = torch.tensor([[1.0, 2.0], [0.5, 3.0]])
    # i=0,j=1: relu(M01 - a M00) + relu(M10 - a M00) = relu(2-1) + relu(.5-1) = 1
    # i=1,j=0: relu(M10 - a M11) + relu(M01 - a M11) = relu(.5-3) + relu(2-3) = 0
    assert float(erc_loss_from_matrix(m, 1.0)) == pytest.approx(1 / 4)
    # identical experts: M_ij = M_ii for all j, so with alpha=1 the first hinge is 0
    same = torch.full((3, 3), 2.0)
    assert float(erc_loss_from_matrix(same, 1.0)) == 0.0


def test_erc_in_the_layer_trains_router_and_expert_gate_projections() -> None:
    torch.manual_seed(0)
    layer = routelab.MoE(d_model=8, d_hidden=6, num_experts=4, router="erc", aux_loss_coef=0.0, erc_alpha=0.5)
    out = layer(torch.randn(2, 5, 8))
    assert set(out.routing.losses) == {"erc"}
    out.routing.losses["erc"].backward()
    assert float(layer.router.scorer.weight.grad.abs().sum()) > 0
    grad_in = layer.experts.w_in_EDH.grad
    assert float(grad_in[..., :6].abs().sum()) > 0 and float(grad_in[..., 6:].abs().sum()) == 0.0  # gate half only
    assert "erc_gate_norm" in out.routing.stats and "erc_noise_bound" in out.routing.stats


def test_eval_mode_draws_no_noise() -> None:
    torch.manual_seed(0)
    layer = routelab.MoE(d_model=8, d_hidden=6, num_experts=4, router="erc").eval()
    x = torch.randn(1, 5, 8)
    a, b = layer(x).routing.losses["erc"], layer(x).routing.losses["erc"]
    assert torch.equal(a, b)


def test_the_expert_reference_is_not_a_submodule() -> None:
    layer = routelab.MoE(d_model=8, d_hidden=6, num_experts=4, router="erc")
    names = [name for name, _ in layer.named_parameters()]
    assert sum(name.endswith("w_in_EDH") for name in names) == 1
    assert not any(key.startswith("router") and "w_in" in key for key in layer.state_dict())


def test_a_router_without_experts_says_how_to_attach_them() -> None:
    router = routelab.create_router("erc", d_model=8, num_experts=4)
    with pytest.raises(routelab.ConfigError, match="attach_experts"):
        router(torch.randn(3, 8))
    with pytest.raises(routelab.ConfigError, match="gate_projection"):
        attach_experts(router, torch.nn.Linear(2, 2))
    with pytest.raises(routelab.ConfigError, match="shape"):
        attach_experts(router, BatchedExperts(3, 8, 4))
        router(torch.randn(3, 8))
    with pytest.raises(routelab.ConfigError, match="erc_loss_coef"):
        routelab.create_router("erc", d_model=8, num_experts=4, erc_loss_coef=-1.0)
    with pytest.raises(routelab.ConfigError, match="erc_alpha"):
        routelab.create_router("erc", d_model=8, num_experts=4, erc_alpha=-0.5)
