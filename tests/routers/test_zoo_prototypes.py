"""ProMoE prototypical routing and the routing contrastive loss (Wei et al. 2025)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import routelab
from routelab.routers.families.prototypes import cluster_means, routing_contrastive_loss


def test_scores_are_cosine_similarities_to_the_prototypes_and_gates_are_the_cosine() -> None:
    torch.manual_seed(0)
    router = routelab.create_router("promoe", d_model=6, num_experts=5)
    x = torch.randn(9, 6)
    routing = router(x)
    cos = F.cosine_similarity(x.unsqueeze(1), router.scorer.prototypes.unsqueeze(0), dim=-1)
    torch.testing.assert_close(routing.logits, cos, atol=1e-6, rtol=1e-5)
    assert routing.topk_idx.shape == (9, 1) and torch.equal(routing.topk_idx[:, 0], cos.argmax(dim=1))
    torch.testing.assert_close(routing.topk_weight[:, 0], cos.max(dim=1).values, atol=1e-6, rtol=1e-5)
    assert float(routing.logits.detach().abs().max()) <= 1.0 + 1e-6
    scaled = router(x * 10.0)
    assert torch.equal(scaled.topk_idx, routing.topk_idx), "cosine routing ignores the token norm"


def test_routing_contrastive_loss_by_hand() -> None:
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    idx = torch.tensor([[0], [1], [1]])  # expert 2 gets no token: excluded
    means, counts = cluster_means(x, idx, 3)
    torch.testing.assert_close(means[:2], torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    assert counts.tolist() == [1.0, 2.0, 0.0]
    tau = 0.5
    # logits = cos(c_e, m_f) / tau = [[2, 0], [0, 2]]; CE per row = log(1 + e^-2)
    expected = math.log(1 + math.exp(-2.0))
    assert float(routing_contrastive_loss(prototypes, x, idx, tau)) == pytest.approx(expected, rel=1e-6)
    assert float(routing_contrastive_loss(prototypes, x, torch.tensor([[0], [0], [0]]), tau)) == 0.0  # one active


def test_top_k_membership_counts_a_token_for_every_expert_it_uses() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    means, counts = cluster_means(x, torch.tensor([[0, 1], [1, -1]]), 2)
    assert counts.tolist() == [1.0, 2.0]
    torch.testing.assert_close(means[1], torch.tensor([0.5, 0.5]))


def test_rcl_in_the_layer_trains_the_prototypes() -> None:
    torch.manual_seed(0)
    layer = routelab.MoE(d_model=8, d_hidden=8, num_experts=4, top_k=2, router="promoe")
    out = layer(torch.randn(2, 16, 8))
    assert set(out.routing.losses) == {"rcl"} and float(out.routing.losses["rcl"].detach()) > 0
    out.aux_loss.backward()
    assert float(layer.router.scorer.prototypes.grad.abs().sum()) > 0


def test_softmax_gate_mode_allows_a_balance_loss() -> None:
    router = routelab.create_router("promoe", d_model=8, num_experts=4, promoe_gate="softmax", aux_loss_coef=1e-2)
    routing = router(torch.randn(10, 8))
    assert set(routing.losses) == {"aux", "rcl"}
    torch.testing.assert_close(routing.scores.sum(dim=1), torch.ones(10))


def test_bad_options_are_refused() -> None:
    with pytest.raises(routelab.ConfigError, match="promoe_gate"):
        routelab.create_router("promoe", d_model=8, num_experts=4, promoe_gate="tanh")
    with pytest.raises(routelab.ConfigError, match="promoe_gate='softmax'"):
        routelab.create_router("promoe", d_model=8, num_experts=4, aux_loss_coef=1e-2)
    with pytest.raises(routelab.ConfigError, match="rcl_temperature"):
        routelab.create_router("promoe", d_model=8, num_experts=4, rcl_temperature=0.0)
    with pytest.raises(routelab.ConfigError, match="rcl_coef"):
        routelab.create_router("promoe", d_model=8, num_experts=4, rcl_coef=-1.0)
