"""Layerwise recurrent router RMoE (Qiu et al. 2024)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import routelab
from routelab.core.context import RoutingContext, TokenBatch
from routelab.routers.families.recurrent import build_recurrent_routers

D, E, R = 12, 5, 6


def route_stack(routers, x_TD: torch.Tensor, context: RoutingContext | None = None) -> list[routelab.Routing]:
    """Route the same tokens through every layer's router, threading one context."""
    context = context if context is not None else RoutingContext()
    batch = TokenBatch.from_mask(1, x_TD.shape[0], None, context=context)
    return [router(x_TD, batch) for router in routers]


def gru_by_hand(cell: nn.GRUCell, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The standard GRU (Cho et al. 2014, as torch.nn.GRUCell): r, z sigmoids, n = tanh(W_in x + b_in + r * (W_hn h + b_hn))."""
    w_ir, w_iz, w_in = cell.weight_ih.chunk(3)
    w_hr, w_hz, w_hn = cell.weight_hh.chunk(3)
    b_ir, b_iz, b_in = cell.bias_ih.chunk(3)
    b_hr, b_hz, b_hn = cell.bias_hh.chunk(3)
    r = torch.sigmoid(x @ w_ir.T + b_ir + h @ w_hr.T + b_hr)
    z = torch.sigmoid(x @ w_iz.T + b_iz + h @ w_hz.T + b_hz)
    n = torch.tanh(x @ w_in.T + b_in + r * (h @ w_hn.T + b_hn))
    return (1 - z) * n + z * h


def test_layers_share_one_cell_and_follow_the_gru_recurrence() -> None:
    torch.manual_seed(0)
    routers = build_recurrent_routers(3, d_model=D, num_experts=E, rnn_hidden_size=R)
    cells = {id(r.scorer.cell) for r in routers}
    assert len(cells) == 1
    x = torch.randn(7, D)
    context = RoutingContext()
    routings = route_stack(routers, x, context)
    h = torch.zeros(7, R)
    for layer, (router, routing) in enumerate(zip(routers, routings)):
        scorer = router.scorer
        h = gru_by_hand(scorer.cell, scorer.proj_in(x), h)  # layer 0: GRU(x~, 0)
        torch.testing.assert_close(routing.logits, scorer.proj_out(h), atol=1e-5, rtol=1e-5)
    assert context.carry["rmoe"][0] == 2


def test_update_gate_forced_to_one_keeps_the_state_at_zero_and_the_logits_at_zero() -> None:
    torch.manual_seed(0)
    routers = build_recurrent_routers(2, d_model=D, num_experts=E, rnn_hidden_size=R)
    with torch.no_grad():
        routers[0].scorer.cell.bias_ih[R : 2 * R] = 1e4  # z = sigmoid(+large) = 1: h' = h
    context = RoutingContext()
    routings = route_stack(routers, torch.randn(5, D), context)
    assert torch.equal(context.carry["rmoe"][1], torch.zeros(5, R))
    for routing in routings:
        assert torch.equal(routing.logits, torch.zeros(5, E))


def test_token_permutation_permutes_the_routing_of_every_layer() -> None:
    torch.manual_seed(0)
    routers = build_recurrent_routers(2, d_model=D, num_experts=E, rnn_hidden_size=R)
    x = torch.randn(9, D)
    perm = torch.randperm(9)
    base = route_stack(routers, x)
    permuted = route_stack(routers, x[perm])
    for a, b in zip(base, permuted):
        torch.testing.assert_close(b.logits, a.logits[perm], atol=1e-6, rtol=1e-6)
        assert torch.equal(b.topk_idx, a.topk_idx[perm])


def test_state_dict_round_trip_keeps_the_cell_shared() -> None:
    def model(seed: int) -> nn.ModuleList:
        torch.manual_seed(seed)
        routers = build_recurrent_routers(2, d_model=D, num_experts=E, rnn_hidden_size=R)
        return nn.ModuleList(routelab.MoE(d_model=D, d_hidden=8, num_experts=E, router=r) for r in routers)

    def forward(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        context = RoutingContext()
        for layer in layers:
            x = x + layer(x, context=context).y
        return x

    src, dst = model(0), model(1)
    buffer = io.BytesIO()
    torch.save(src.state_dict(), buffer)
    buffer.seek(0)
    dst.load_state_dict(torch.load(buffer))
    x = torch.randn(2, 4, D)
    torch.testing.assert_close(forward(dst, x), forward(src, x))
    cell0, cell1 = dst[0].router.scorer.cell, dst[1].router.scorer.cell
    assert cell0 is cell1
    assert sum(p.numel() for p in dst.parameters()) < sum(p.numel() for _, p in dst.named_parameters(remove_duplicate=False))


def test_detach_state_cuts_the_gradient_between_layers() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, D)
    for detach, expect_grad in ((False, True), (True, False)):
        routers = build_recurrent_routers(2, d_model=D, num_experts=E, rnn_hidden_size=R, detach_state=detach)
        second = route_stack(routers, x)[1]
        second.logits.square().sum().backward()
        grad = routers[0].scorer.proj_in.weight.grad
        assert (grad is not None and float(grad.abs().sum()) > 0) == expect_grad


def test_tanh_rnn_variant_runs() -> None:
    routers = build_recurrent_routers(2, d_model=D, num_experts=E, rnn_hidden_size=R, cell_type="rnn")
    assert isinstance(routers[1].scorer.cell, nn.RNNCell)
    assert torch.isfinite(route_stack(routers, torch.randn(4, D))[1].logits).all()


def test_missing_or_mismatched_state_is_refused() -> None:
    routers = build_recurrent_routers(2, d_model=D, num_experts=E, rnn_hidden_size=R)
    with pytest.raises(routelab.InputError, match="same forward"):
        routers[1](torch.randn(4, D))  # no context: layer 1 has no state of layer 0
    context = RoutingContext()
    route_stack(routers[:1], torch.randn(4, D), context)
    with pytest.raises(routelab.InputError, match="padding mask"):
        route_stack(routers[1:], torch.randn(3, D), context)
    # A first layer ignores (and overwrites) a stale state in a reused context.
    first = route_stack(routers[:1], torch.randn(3, D), context)
    assert first[0].logits.shape == (3, E) and context.carry["rmoe"][0] == 0


def test_bad_options_are_refused() -> None:
    with pytest.raises(routelab.ConfigError, match="cell_type"):
        routelab.create_router("rmoe", d_model=D, num_experts=E, cell_type="lstm")
    with pytest.raises(routelab.ConfigError, match="rnn_cell"):
        routelab.create_router("rmoe", d_model=D, num_experts=E, rnn_cell=nn.Linear(4, 4))
    with pytest.raises(routelab.ConfigError, match="rnn_cell"):
        routelab.create_router("rmoe", d_model=D, num_experts=E, rnn_cell=nn.GRUCell(4, 6))
    with pytest.raises(routelab.ConfigError, match="layer_index"):
        routelab.create_router("rmoe", d_model=D, num_experts=E, layer_index=-1)
    with pytest.raises(routelab.ConfigError, match="rnn_hidden_size"):
        routelab.create_router("rmoe", d_model=D, num_experts=E, rnn_hidden_size=0)


def test_carry_key_and_layer_index_choose_the_state_a_layer_reads_and_writes() -> None:
    torch.manual_seed(0)
    cell = nn.GRUCell(R, R)
    make = lambda layer, key: routelab.create_router(  # noqa: E731
        "rmoe", d_model=D, num_experts=E, rnn_cell=cell, rnn_hidden_size=R, layer_index=layer, carry_key=key)
    x = torch.randn(4, D)
    context = RoutingContext()
    route_stack([make(0, "stack-a")], x, context)
    assert set(context.carry) == {"stack-a"} and context.carry["stack-a"][0] == 0  # written under its key
    with pytest.raises(routelab.InputError, match="needs the routing state of layer 0"):
        route_stack([make(1, "stack-b")], x, context)  # another key: nothing carried for it
    route_stack([make(1, "stack-a")], x, context)
    assert context.carry["stack-a"][0] == 1
    with pytest.raises(routelab.InputError, match="needs the routing state of layer 2"):
        route_stack([make(3, "stack-a")], x, context)  # a skipped layer index is refused
