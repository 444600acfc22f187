"""Router replay: recorded selections forced into later forwards reproduce the recorded run bit for bit."""

from __future__ import annotations

import pytest
import torch

import routelab
from routelab.core.errors import ConfigError, InputError


def moe_stack(router: str = "loss-free", **options) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers = [routelab.MoE(d_model=16, d_hidden=32, num_experts=8, top_k=2, router=router, **options) for _ in range(2)]
    return torch.nn.Sequential(*layers)


def run(model: torch.nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    routes = []
    for layer in model:
        out = layer(x)
        routes.append(out.routing.topk_idx)
        x = x + out.y
    return x, routes


def push_bias(model: torch.nn.Sequential) -> None:
    """A large selection bias: it changes which experts are chosen, never the gate values."""
    with torch.no_grad():
        for layer in model:
            layer.router.balancer.bias.copy_(torch.linspace(1.0, -1.0, 8))


def test_replay_forces_the_recorded_experts_and_reproduces_the_outputs_bit_for_bit():
    model = moe_stack().eval()
    x = torch.randn(2, 12, 16)
    with routelab.record_routing(model) as record:
        recorded_y, recorded_routes = run(model, x)
    push_bias(model)
    moved_y, moved_routes = run(model, x)
    assert not all(torch.equal(a, b) for a, b in zip(moved_routes, recorded_routes))
    with routelab.replay_routing(model, record):
        replayed_y, replayed_routes = run(model, x)
    assert all(torch.equal(a, b) for a, b in zip(replayed_routes, recorded_routes))
    assert torch.equal(replayed_y, recorded_y)
    assert not torch.equal(moved_y, recorded_y)


def test_replayed_gates_carry_gradient_to_the_router():
    model = moe_stack().train()
    x = torch.randn(2, 12, 16)
    with routelab.record_routing(model) as record:
        run(model, x)
    model.zero_grad()
    with routelab.replay_routing(model, record):
        y, _ = run(model, x)
    y.square().mean().backward()
    assert all(layer.router.scorer.weight.grad.abs().sum() > 0 for layer in model)


def test_replay_with_capacity_drops_the_same_assignments():
    model = moe_stack("gshard").eval()
    x = torch.randn(2, 12, 16)
    with routelab.record_routing(model) as record:
        recorded_y, recorded_routes = run(model, x)
    with routelab.replay_routing(model, record):
        replayed_y, replayed_routes = run(model, x)
    assert any((r == -1).any() for r in recorded_routes)  # capacity dropped something
    assert all(torch.equal(a, b) for a, b in zip(replayed_routes, recorded_routes))
    assert torch.equal(replayed_y, recorded_y)


def test_replay_refuses_what_it_cannot_reproduce():
    model = moe_stack().eval()
    x = torch.randn(2, 12, 16)
    with routelab.record_routing(model) as record:
        run(model, x)
    with routelab.replay_routing(model, record), pytest.raises(InputError, match="routes 10 tokens"):
        run(model, x[:, :5])
    with routelab.replay_routing(model, record), pytest.raises(InputError, match="called 2 times"):
        run(model, x)
        run(model, x)
    with pytest.raises(ConfigError, match="no selection for router"):
        with routelab.replay_routing(moe_stack(), routelab.RoutingRecord()):
            pass
    expert_choice = moe_stack("expert-choice").eval()
    with routelab.record_routing(expert_choice) as ec_record:
        run(expert_choice, x)
    with pytest.raises(ConfigError, match="cannot be recomputed"):
        with routelab.replay_routing(expert_choice, ec_record):
            pass
    with pytest.raises(ConfigError, match="holds no routelab Router"):
        with routelab.record_routing(torch.nn.Linear(2, 2)):
            pass


@pytest.mark.parametrize("arch", ["deepseek_v3", "mixtral", "gpt_oss"])
def test_replay_into_an_attached_transformers_model_is_bit_exact(arch):
    pytest.importorskip("transformers")
    from routelab.hf import attach
    from routelab.models.hf.routers import add_selection_offset
    from tests.hf_tiny import tiny_batch, tiny_model

    model = tiny_model(arch)
    ids, mask = tiny_batch(padded=True)
    with attach(model) as handle:
        routers = handle.ensure_routelab()
        with routelab.record_routing(model) as record, torch.no_grad():
            recorded = model(ids, attention_mask=mask).logits
        for router in routers.values():  # a selection offset that moves the choices, not the gates
            add_selection_offset(router, "shift", torch.linspace(-3.0, 3.0, handle.num_experts))
        with torch.no_grad():
            moved = model(ids, attention_mask=mask).logits
        with routelab.replay_routing(model, record), torch.no_grad():
            replayed = model(ids, attention_mask=mask).logits
    assert not torch.equal(moved, recorded)
    assert torch.equal(replayed, recorded)
