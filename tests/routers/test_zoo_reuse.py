"""ReXMoE expert reuse with PSR, condenser experts with sparsifying bias, DeepSeekMoE shared
experts and group-limited routing."""

from __future__ import annotations

import pytest
import torch

import routelab
from routelab.moe.dispatch import dispatch_combine
from routelab.moe.experts import BatchedExperts
from routelab.moe.pool import ExpertPool, build_rexmoe_layers, reuse_window
from routelab.routers.families.reuse import enable_order
from tests.reference import reference_moe

D = 8


def test_psr_starts_as_the_layer_local_router_and_ends_with_the_whole_pool() -> None:
    torch.manual_seed(0)
    pool_router = routelab.create_router("rexmoe", d_model=D, num_experts=12, top_k=2, reuse_factor=3, local_block=1,
                                         psr_steps=4)
    local = routelab.create_router("mixtral", d_model=D, num_experts=4, top_k=2)
    local.scorer.weight.data.copy_(pool_router.scorer.weight.data[4:8])
    x = torch.randn(40, D)
    start, vanilla = pool_router(x), local(x)
    assert torch.equal(start.topk_idx - 4, vanilla.topk_idx), "PSR start = the layer-local router"
    torch.testing.assert_close(start.topk_weight, vanilla.topk_weight)
    enabled = []
    for _ in range(5):
        enabled.append(int(pool_router.scorer.enabled_mask().sum()))
        routing = pool_router(x)
        chosen = set(routing.topk_idx[routing.topk_idx >= 0].tolist())
        assert chosen <= set(torch.nonzero(pool_router.scorer.enabled_mask()).flatten().tolist()), "masked never selected"
        routelab.end_of_step(pool_router)
    assert enabled == [4, 6, 8, 10, 12]
    assert bool(pool_router.scorer.enabled_mask().all()), "final pool = R*E"


def test_psr_enables_the_nearest_blocks_first_and_at_least_top_k() -> None:
    assert enable_order(9, 3, 0).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert enable_order(9, 3, 2).tolist() == [6, 7, 8, 3, 4, 5, 0, 1, 2]
    assert enable_order(6, 3, 1).tolist() == [2, 3, 0, 1, 4, 5]
    router = routelab.create_router("rexmoe", d_model=D, num_experts=6, top_k=3, reuse_factor=3, psr_steps=10)
    assert int(router.scorer.enabled_mask().sum()) == 3  # local block of 2 < top_k
    assert torch.isfinite(router(torch.randn(5, D)).topk_weight).all()


def test_expert_pool_runs_shared_blocks_like_one_expert_bank() -> None:
    torch.manual_seed(0)
    blocks = [BatchedExperts(3, D, 5), BatchedExperts(3, D, 5)]
    pool = ExpertPool(blocks)
    merged = BatchedExperts(6, D, 5)
    with torch.no_grad():
        merged.w_in_EDH.copy_(torch.cat([b.w_in_EDH for b in blocks]))
        merged.w_out_EHD.copy_(torch.cat([b.w_out_EHD for b in blocks]))
    x = torch.randn(11, D)
    idx = torch.randint(0, 6, (11, 2))
    idx[0, 1] = -1
    w = torch.rand(11, 2)
    torch.testing.assert_close(dispatch_combine(x, idx, w, pool), dispatch_combine(x, idx, w, merged))
    torch.testing.assert_close(dispatch_combine(x, idx, w, pool), reference_moe(x, idx, w, merged))
    torch.testing.assert_close(pool.gate_projection(), merged.gate_projection())


def test_build_rexmoe_layers_shares_adjacent_experts() -> None:
    assert [reuse_window(layer, 4, 3) for layer in range(4)] == [0, 0, 1, 1]
    torch.manual_seed(0)
    layers = build_rexmoe_layers(4, d_model=D, d_hidden=6, num_experts=2, top_k=2, psr_steps=2)
    assert all(layer.num_experts == 6 for layer in layers)
    assert layers[0].experts.blocks[1] is layers[1].experts.blocks[1] is layers[2].experts.blocks[0]
    assert [layer.router.scorer.local_block for layer in layers] == [0, 1, 1, 2]
    own = {id(layer.experts.blocks[layer.router.scorer.local_block]) for layer in layers}
    assert len(own) == 4, "every layer owns a distinct block"
    unique = sum(p.numel() for p in layers.parameters())
    per_block = sum(p.numel() for p in layers[0].experts.blocks[0].parameters())
    routers = sum(p.numel() for layer in layers for p in layer.router.parameters())
    assert unique == 4 * per_block + routers, "expert weights are stored once"
    x = torch.randn(2, 5, D, requires_grad=True)
    h = x
    for layer in layers:
        h = h + layer(h).y
    h.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert routelab.end_of_step(layers) == 4


def test_condenser_bias_concentrates_routing_and_never_changes_gates() -> None:
    torch.manual_seed(0)
    layer = routelab.MoE(d_model=D, d_hidden=6, num_experts=4, router="condenser", num_shared_experts=1,
                         shared_expert_gate=True, bias_update_rate=0.05)
    bias = layer.router.balancer
    bias.pending_counts.copy_(torch.tensor([10.0, 1.0, 5.0, 4.0]))  # mean 5
    routelab.end_of_step(layer)
    torch.testing.assert_close(bias.bias, torch.tensor([0.05, -0.05, 0.0, -0.05]))  # sign(c - mean): rich get richer
    tail = routelab.create_router("condenser", d_model=D, num_experts=4, sparsify_rule="tail", tail_fraction=0.5)
    tail.balancer.pending_counts.copy_(torch.tensor([10.0, 1.0, 5.0, 4.0]))
    tail.end_of_step()
    torch.testing.assert_close(tail.balancer.bias, torch.tensor([0.0, -1e-3, 0.0, 0.0]))  # only c < 2.5 pushed down
    out = layer(torch.randn(1, 6, D))
    scores = out.routing.scores.gather(1, out.routing.topk_idx)
    torch.testing.assert_close(out.routing.topk_weight, scores / scores.sum(dim=1, keepdim=True))
    assert layer.shared_gate is not None and "balancer.bias" in dict(layer.router.named_buffers())


def test_condenser_training_concentrates_load_on_fewer_experts() -> None:
    torch.manual_seed(0)
    layer = routelab.MoE(d_model=D, d_hidden=6, num_experts=8, router="condenser", bias_update_rate=0.02)
    x = torch.randn(1, 256, D)
    first = layer(x).routing.stats["load"].clone()
    for _ in range(30):
        layer(x)
        routelab.end_of_step(layer)
    last = layer(x).routing.stats["load"]
    assert int((last == 0).sum()) > int((first == 0).sum()), "long-tailed experts pushed to inactivity"


def test_deepseek_shared_experts_recipe_and_group_limited_selection() -> None:
    torch.manual_seed(0)
    layer = routelab.MoE(d_model=D, d_hidden=6, num_experts=16, top_k=4, router="deepseek-v3", num_shared_experts=2,
                         num_groups=4, group_topk=2)
    out = layer(torch.randn(2, 9, D))
    groups = out.routing.topk_idx // 4
    assert max(len(set(row)) for row in groups.tolist()) <= 2, "selected experts lie in <= g_top groups"
    shared_out = layer.shared_experts(torch.zeros(1, D))
    assert shared_out.shape == (1, D)


def test_bad_options_are_refused() -> None:
    with pytest.raises(routelab.ConfigError, match="reuse_factor"):
        routelab.create_router("rexmoe", d_model=D, num_experts=2, top_k=1, reuse_factor=3)
    with pytest.raises(routelab.ConfigError, match="local_block"):
        routelab.create_router("rexmoe", d_model=D, num_experts=6, local_block=3)
    with pytest.raises(routelab.ConfigError, match="psr_steps"):
        routelab.create_router("rexmoe", d_model=D, num_experts=6, psr_steps=-1)
    with pytest.raises(routelab.ConfigError, match="num_layers"):
        build_rexmoe_layers(2, d_model=D, d_hidden=4, num_experts=2, reuse_factor=3)
    with pytest.raises(routelab.ConfigError, match="sparsify_rule"):
        routelab.create_router("condenser", d_model=D, num_experts=4, sparsify_rule="median")
    with pytest.raises(routelab.ConfigError, match="experts="):
        routelab.MoE(d_model=D, d_hidden=4, num_experts=5, router="mixtral", experts=BatchedExperts(4, D, 4))
    with pytest.raises(routelab.ConfigError, match="d_model"):
        ExpertPool([BatchedExperts(2, D, 4), BatchedExperts(2, D + 1, 4)])
