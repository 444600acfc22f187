"""Soft MoE (Puigcerver et al. 2023): slots as soft combinations of tokens."""

from __future__ import annotations

import copy

import pytest
import torch

import routelab
from routelab.core.context import TokenBatch
from routelab.moe.soft import SoftMoE
from routelab.routers.families.soft import SoftRouter, soft_dispatch_weights
from tests.reference import reference_expert

D = 8


def reference_soft_moe(layer: SoftMoE, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One sequence and one slot at a time, from the definitions."""
    scorer = layer.router.scorer
    p = scorer.slots_per_expert
    y = torch.zeros_like(x)
    for b in range(x.shape[0]):
        real = mask[b].nonzero().flatten()
        if real.numel() == 0:
            continue
        x_b = x[b, real]
        logits = scorer.slot_logits(x_b)
        dispatch = torch.softmax(logits, dim=0)  # over tokens, per slot
        combine = torch.softmax(logits, dim=1)  # over slots, per token
        slot_out = torch.stack([
            reference_expert(layer.experts, s // p, dispatch[:, s] @ x_b) for s in range(logits.shape[1])
        ])
        y[b, real] = combine @ slot_out
    return y


def test_moe_layer_of_a_soft_router_is_a_soft_moe_layer() -> None:
    layer = routelab.moe_layer(d_model=D, d_hidden=6, num_experts=3, router="soft-moe")
    assert isinstance(layer, SoftMoE) and isinstance(layer, routelab.MoE)
    assert isinstance(layer.router, SoftRouter) and layer.router.name == "soft-moe"
    assert "soft-moe" in [r["name"] for r in routelab.list_routers()]
    prebuilt = routelab.create_router("soft-moe", d_model=D, num_experts=3)
    assert isinstance(routelab.moe_layer(d_model=D, d_hidden=6, num_experts=3, router=prebuilt), SoftMoE)
    assert type(routelab.moe_layer(d_model=D, d_hidden=6, num_experts=3, router="mixtral")) is routelab.MoE
    assert type(SoftMoE(d_model=D, d_hidden=6, num_experts=3)) is SoftMoE  # router defaults to soft-moe
    clone = copy.deepcopy(layer)
    assert type(clone) is SoftMoE and torch.equal(clone.router.scorer.phi, layer.router.scorer.phi)


@pytest.mark.parametrize("normalize", [True, False])
def test_layer_matches_the_reference_with_padding(normalize: bool) -> None:
    torch.manual_seed(0)
    layer = routelab.SoftMoE(d_model=D, d_hidden=6, num_experts=3, router="soft-moe", slots_per_expert=2,
                         normalize=normalize)
    x = torch.randn(3, 7, D, requires_grad=True)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, :] = False  # a sequence made only of padding
    out = layer(x, padding_mask=mask)
    expected = reference_soft_moe(layer, x, mask)
    torch.testing.assert_close(out.y, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.y[~mask], torch.zeros_like(out.y[~mask]))
    g = torch.randn_like(out.y)
    grad_fast = torch.autograd.grad((out.y * g).sum(), [x, layer.router.scorer.phi, layer.experts.w_in_EDH])
    grad_ref = torch.autograd.grad((expected * g).sum(), [x, layer.router.scorer.phi, layer.experts.w_in_EDH])
    for a, b in zip(grad_fast, grad_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_combine_and_dispatch_weights_sum_to_one_and_exclude_padding() -> None:
    torch.manual_seed(0)
    router = routelab.create_router("soft-moe", d_model=D, num_experts=4, slots_per_expert=3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    tb = TokenBatch.from_mask(2, 5, mask)
    x = torch.randn(7, D)
    soft = router.route_slots(x, tb)
    routing = soft.routing
    torch.testing.assert_close(routing.topk_weight.sum(dim=1), torch.ones(7))  # combine mass per token
    assert routing.topk_idx.tolist() == [[0, 1, 2, 3]] * 7
    torch.testing.assert_close(torch.softmax(routing.logits, dim=1), routing.topk_weight)
    dispatch = soft_dispatch_weights(soft.slot_logits_TN, tb)
    assert dispatch.shape == (2, 5, 12)
    torch.testing.assert_close(dispatch.sum(dim=1), torch.ones(2, 12))  # per slot, over the real tokens
    assert torch.equal(dispatch[1, 2:], torch.zeros(3, 12))
    assert float(routing.stats["load"].sum()) == 7 * 4


def test_permuting_tokens_within_a_sequence_permutes_the_output() -> None:
    torch.manual_seed(0)
    layer = routelab.SoftMoE(d_model=D, d_hidden=6, num_experts=3, router="soft-moe").eval()
    x = torch.randn(2, 6, D)
    perm = torch.randperm(6)
    torch.testing.assert_close(layer(x[:, perm]).y, layer(x).y[:, perm], atol=1e-5, rtol=1e-5)


def test_bad_options_are_refused() -> None:
    for option in ({"capacity_factor": 1.0}, {"aux_loss_coef": 1e-2}, {"z_loss_coef": 1e-3}):
        with pytest.raises(routelab.ConfigError, match="soft-moe does not support"):
            routelab.SoftMoE(d_model=D, d_hidden=6, num_experts=3, router="soft-moe", **option)
    with pytest.raises(routelab.ConfigError, match="slots_per_expert"):
        routelab.create_router("soft-moe", d_model=D, num_experts=3, slots_per_expert=0)
    with pytest.raises(routelab.ConfigError, match="SoftMoE needs"):
        SoftMoE(d_model=D, d_hidden=6, num_experts=3, router="mixtral")


def test_moe_refuses_a_soft_router_and_names_the_layer_to_use() -> None:
    for router in ("soft-moe", routelab.create_router("soft-moe", d_model=D, num_experts=3)):
        with pytest.raises(routelab.ConfigError, match="routelab.SoftMoE.*routelab.moe_layer"):
            routelab.MoE(d_model=D, d_hidden=6, num_experts=3, router=router)


def test_soft_moe_refuses_timestep_and_attention_instead_of_dropping_them() -> None:
    layer = routelab.SoftMoE(d_model=D, d_hidden=6, num_experts=3)
    x = torch.randn(2, 5, D)
    with pytest.raises(routelab.ConfigError, match="timestep"):
        layer(x, timestep=torch.tensor([0.5, 0.5]))
    with pytest.raises(routelab.ConfigError, match="attention"):
        layer(x, attention=torch.full((2, 5, 5), 0.2))
    # a model-wide context may carry them for other layers' routers; this layer reads neither
    shared = routelab.RoutingContext(timestep=torch.tensor([0.5, 0.5]), attention=torch.full((2, 5, 5), 0.2))
    torch.testing.assert_close(layer(x, context=shared).y, layer(x).y)
