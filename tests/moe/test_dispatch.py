"""Dispatch equals the slow per-token reference (outputs and every gradient) for every preset."""

from __future__ import annotations

import pytest
import torch

import routelab
from routelab.core.context import TokenBatch
from routelab.moe.dispatch import dispatch_combine
from routelab.moe.experts import DenseFFN
from tests.helpers import ALL_PRESETS, make_layer, preset, side_inputs, valid_top_k
from tests.reference import reference_moe

ATOL = 1e-5


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))


def _check_against_reference(layer: routelab.MoE, batch: int = 2, seq: int = 9) -> routelab.Routing:
    torch.manual_seed(1)
    x = torch.randn(batch, seq, layer.d_model, requires_grad=True)
    extra = side_inputs(batch, seq)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[1, seq - 3 :] = False
    tb = TokenBatch.from_mask(batch, seq, mask, token_ids=extra["token_ids"], context=routelab.RoutingContext(
        attention=extra["attention"], timestep=extra["timestep"]))
    x_TD = x.reshape(-1, layer.d_model)[tb.flat_index_T]
    routing = layer.router(x_TD, tb)
    fast = dispatch_combine(x_TD, routing.topk_idx, routing.topk_weight, layer.experts)
    slow = reference_moe(x_TD, routing.topk_idx, routing.topk_weight, layer.experts)
    torch.testing.assert_close(fast, slow, atol=ATOL, rtol=1e-5)
    g = torch.randn_like(fast)
    params = [x, layer.experts.w_in_EDH, layer.experts.w_out_EHD] + [
        p for p in layer.router.parameters() if p.requires_grad
    ]
    for a, b in zip(_grads((fast * g).sum(), params), _grads((slow * g).sum(), params)):
        if a is None or b is None:  # a parameter unused by one path must get no gradient from the other
            other = a if a is not None else b
            assert other is None or float(other.abs().max()) == 0.0
            continue
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)
    return routing


@pytest.mark.parametrize("name", ALL_PRESETS)
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("impl", ["auto", "loop"])
def test_dispatch_matches_reference(name: str, capacity_factor: float | None, impl: str) -> None:
    info = preset(name)
    if capacity_factor is not None and "capacity_factor" in info.exemptions:
        pytest.skip(info.exemptions["capacity_factor"])
    k = valid_top_k(info, 4, 2)
    options = {} if capacity_factor is None else {"capacity_factor": capacity_factor}
    layer = make_layer(name, num_experts=4, top_k=k, dispatch=impl, **options)
    layer.train()
    _check_against_reference(layer)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_layer_output_matches_reference_with_padding_and_shared(activation: str) -> None:
    layer = make_layer("mixtral", num_experts=4, top_k=2, activation=activation, num_shared_experts=1,
                       capacity_factor=0.75)
    x = torch.randn(2, 7, 8)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    out = layer(x, padding_mask=mask)
    x_TD = x.reshape(-1, 8)[mask.reshape(-1)]
    expected = reference_moe(x_TD, out.routing.topk_idx, out.routing.topk_weight, layer.experts)
    expected = expected + layer.shared_experts(x_TD)
    torch.testing.assert_close(out.y[mask], expected, atol=ATOL, rtol=1e-5)
    assert torch.equal(out.y[~mask], torch.zeros_like(out.y[~mask]))
    assert out.routing.stats["dropped"] > 0  # capacity 0.75 must drop something


def test_one_expert_top1_equals_dense_ffn() -> None:
    torch.manual_seed(0)
    layer = routelab.MoE(d_model=8, d_hidden=16, num_experts=1, top_k=1, router="switch", aux_loss_coef=0.0)
    dense = DenseFFN(8, 16)
    with torch.no_grad():
        dense.w_in.weight.copy_(layer.experts.w_in_EDH[0].T)
        dense.w_out.weight.copy_(layer.experts.w_out_EHD[0].T)
    x = torch.randn(3, 5, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out = layer(x)
    ref = dense(x2)
    torch.testing.assert_close(out.y, ref, atol=ATOL, rtol=1e-5)
    g = torch.randn_like(ref)
    (out.y * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(layer.experts.w_in_EDH.grad[0], dense.w_in.weight.grad.T, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(layer.experts.w_out_EHD.grad[0], dense.w_out.weight.grad.T, atol=ATOL, rtol=1e-5)


def test_backward_from_plain_sum_works() -> None:
    """A stride-0 incoming gradient (``y.sum().backward()``) must not break grouped GEMM backward."""
    layer = make_layer("mixtral", num_experts=4, top_k=2)
    x = torch.randn(2, 5, 8, requires_grad=True)
    layer(x).y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert layer.experts.w_in_EDH.grad.abs().sum() > 0


def test_grouped_and_loop_dispatch_agree_in_bf16() -> None:
    torch.manual_seed(0)
    fast = make_layer("mixtral", num_experts=4, top_k=2, d_hidden=16, dispatch="grouped_mm").to(torch.bfloat16)
    loop = make_layer("mixtral", num_experts=4, top_k=2, d_hidden=16, dispatch="loop").to(torch.bfloat16)
    loop.load_state_dict(fast.state_dict())
    x = torch.randn(2, 6, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(fast(x).y, loop(x).y, atol=2e-2, rtol=2e-2)


def test_autocast_bf16_keeps_router_fp32() -> None:
    layer = make_layer("mixtral", num_experts=4, top_k=2)
    x = torch.randn(2, 6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.routing.logits.dtype == torch.float32
    assert out.routing.topk_weight.dtype == torch.float32
    assert out.y.dtype == torch.bfloat16
