"""Router-agnostic properties, checked with hypothesis for every preset of the registry.

A preset that cannot satisfy a property declares it in ``exemptions`` with the reason
(shown in docs/routers.md); the exempt case is skipped here, never weakened.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import routelab
from routelab.routers.parts.router import RoutingDraft
from tests.helpers import ALL_PRESETS, make_layer, preset, side_inputs, valid_top_k

SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
D_MODEL = 8


def draw_case(data, name: str, *, capacity: bool = False):
    info = preset(name)
    num_experts = data.draw(st.integers(max(1, info.min_top_k), 8), label="num_experts")
    top_k = valid_top_k(info, num_experts, data.draw(st.integers(1, 4), label="top_k"))
    assume(top_k is not None)
    options = {}
    if capacity:
        options["capacity_factor"] = data.draw(st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0]), label="capacity_factor")
    batch = data.draw(st.integers(1, 3), label="batch")
    seq = data.draw(st.integers(1, 12), label="seq")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    try:
        layer = make_layer(name, d_model=D_MODEL, num_experts=num_experts, top_k=top_k, seed=seed, **options)
    except routelab.ConfigError:
        assume(False)  # a configuration this preset refuses (refusals are tested in test_errors)
    return layer, batch, seq, torch.Generator().manual_seed(seed), seed


def route(layer: routelab.MoE, x: torch.Tensor, mask=None, extra=None) -> routelab.MoEOutput:
    extra = extra or side_inputs(x.shape[0], x.shape[1])
    # the side inputs travel as a model would pass them to every layer: in a shared RoutingContext
    # (a layer whose router reads neither timestep nor attention refuses them as direct arguments)
    context = routelab.RoutingContext(attention=extra["attention"], timestep=extra["timestep"])
    return layer(x, padding_mask=mask, token_ids=extra["token_ids"], context=context)


def row_sets(routing: routelab.Routing) -> list[dict[int, float]]:
    """Each token's {expert: weight}, order-free (slot order is not part of the contract)."""
    return [
        {e: w for e, w in zip(idx_row, w_row) if e >= 0}
        for idx_row, w_row in zip(routing.topk_idx.tolist(), routing.topk_weight.tolist())
    ]


def assert_same_routing(actual: list[dict[int, float]], expected: list[dict[int, float]], tol: float = 1e-5) -> None:
    """Same experts for every token, and the same weights up to float rounding (routers that
    sum over a sequence may accumulate in another order)."""
    assert len(actual) == len(expected)
    for t, (a, b) in enumerate(zip(actual, expected)):
        assert set(a) == set(b), f"token {t}: experts {sorted(a)} != {sorted(b)}"
        for e in a:
            assert abs(a[e] - b[e]) <= tol * (1 + abs(b[e])), f"token {t}, expert {e}: {a[e]} != {b[e]}"


@pytest.mark.parametrize("name", ALL_PRESETS)
@SETTINGS
@given(data=st.data())
def test_empty_slots_have_zero_weight_and_nothing_is_nan(name, data) -> None:
    layer, batch, seq, g, _ = draw_case(data, name)
    out = route(layer, torch.randn(batch, seq, D_MODEL, generator=g))
    r = out.routing
    assert r.topk_idx.dtype == torch.int64 and r.topk_idx.shape[0] == batch * seq
    assert bool(((r.topk_idx >= -1) & (r.topk_idx < layer.num_experts)).all())
    assert bool((r.topk_weight[r.topk_idx < 0] == 0).all())
    assert torch.isfinite(out.y).all() and torch.isfinite(r.topk_weight).all()
    assert all(torch.isfinite(v).all() for v in r.losses.values())
    assert torch.isfinite(out.aux_loss)
    assert r.logits.dtype == torch.float32 and r.logits.shape == (batch * seq, layer.num_experts)
    for key in ("load", "max_vio", "cv", "entropy", "dead_experts", "drop_rate", "tokens_without_expert"):
        assert torch.isfinite(r.stats[key]).all(), key
    assert float(r.stats["load"].sum()) == float((r.topk_idx >= 0).sum())


@pytest.mark.parametrize("name", ALL_PRESETS)
@SETTINGS
@given(data=st.data())
def test_capacity_is_never_exceeded(name, data) -> None:
    if "capacity_factor" in preset(name).exemptions:
        pytest.skip(preset(name).exemptions["capacity_factor"])
    layer, batch, seq, g, _ = draw_case(data, name, capacity=True)
    r = route(layer, torch.randn(batch, seq, D_MODEL, generator=g)).routing
    assert r.capacity is not None, f"{name} ignored capacity_factor"
    assert float(r.stats["load"].max()) <= r.capacity
    assert float(r.stats["dropped"]) == float(r.stats["load_before_drop"].sum() - r.stats["load"].sum())


@pytest.mark.parametrize("name", ALL_PRESETS)
@SETTINGS
@given(data=st.data())
def test_token_permutation_equivariance(name, data) -> None:
    """Permuting positions inside every sequence, and the order of sequences, permutes the routing."""
    if "token_permutation" in preset(name).exemptions:
        pytest.skip(preset(name).exemptions["token_permutation"])
    layer, batch, seq, g, seed = draw_case(data, name)
    layer.eval()
    x = torch.randn(batch, seq, D_MODEL, generator=g)
    extra = side_inputs(batch, seq, seed=seed)
    perm_S = torch.randperm(seq, generator=g)
    perm_B = torch.randperm(batch, generator=g)
    extra_p = {
        "token_ids": extra["token_ids"][perm_B][:, perm_S],
        "attention": extra["attention"][perm_B][:, perm_S][:, :, perm_S],
        "timestep": extra["timestep"][perm_B],
    }
    base = row_sets(route(layer, x, extra=extra).routing)
    permuted = row_sets(route(layer, x[perm_B][:, perm_S], extra=extra_p).routing)
    flat_perm = (perm_B.view(-1, 1) * seq + perm_S.view(1, -1)).reshape(-1).tolist()
    assert_same_routing(permuted, [base[i] for i in flat_perm])


@pytest.mark.parametrize("name", ALL_PRESETS)
@SETTINGS
@given(data=st.data())
def test_padding_does_not_change_real_tokens(name, data) -> None:
    if "padding_invariance" in preset(name).exemptions:
        pytest.skip(preset(name).exemptions["padding_invariance"])
    layer, batch, seq, g, seed = draw_case(data, name)
    layer.eval()
    pad = data.draw(st.integers(1, 4), label="pad")
    x = torch.randn(batch, seq, D_MODEL, generator=g)
    extra = side_inputs(batch, seq + pad, seed=seed)  # causal attention: real rows never see the pads
    plain_extra = {
        "token_ids": extra["token_ids"][:, :seq],
        "attention": extra["attention"][:, :seq, :seq],
        "timestep": extra["timestep"],
    }
    x_padded = torch.cat([x, torch.randn(batch, pad, D_MODEL, generator=g) * 100], dim=1)
    mask = torch.zeros(batch, seq + pad, dtype=torch.bool)
    mask[:, :seq] = True
    plain = route(layer, x, extra=plain_extra)
    padded = route(layer, x_padded, mask=mask, extra=extra)
    assert_same_routing(row_sets(padded.routing), row_sets(plain.routing))
    torch.testing.assert_close(padded.y[:, :seq], plain.y, atol=1e-5, rtol=1e-5)
    assert bool((padded.y[:, seq:] == 0).all())
    assert float(padded.routing.stats["num_tokens"]) == batch * seq
    for key, value in plain.routing.losses.items():
        torch.testing.assert_close(padded.routing.losses[key], value, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL_PRESETS)
@SETTINGS
@given(data=st.data())
def test_renormalised_weights_sum_to_scaling_factor(name, data) -> None:
    layer, batch, seq, g, _ = draw_case(data, name)
    gate_norm = getattr(layer.router, "gate_norm", None)
    if gate_norm is None or getattr(gate_norm, "mode", None) != "renorm" or layer.router.capacity is not None:
        pytest.skip("this preset does not renormalise its gates (or drops by capacity by default)")
    r = route(layer, torch.randn(batch, seq, D_MODEL, generator=g)).routing
    routed = (r.topk_idx >= 0).any(dim=1)
    sums = r.topk_weight.sum(dim=1)[routed]
    torch.testing.assert_close(sums, torch.full_like(sums, gate_norm.scaling_factor), atol=1e-5, rtol=1e-5)


def _has_balancer(name: str) -> bool:
    layer = make_layer(name, num_experts=8, top_k=valid_top_k(preset(name), 8, 2))
    return getattr(layer.router, "balancer", None) is not None and hasattr(layer.router.balancer, "bias")


BALANCED = [n for n in ALL_PRESETS if _has_balancer(n)]


@pytest.mark.parametrize("name", BALANCED)
@SETTINGS
@given(seed=st.integers(0, 2**16))
def test_balancing_bias_changes_selection_not_gates(name, seed) -> None:
    layer = make_layer(name, num_experts=8, top_k=2, seed=seed)
    router = layer.router
    x = torch.randn(1, 32, D_MODEL, generator=torch.Generator().manual_seed(seed))
    before = route(layer, x).routing
    with torch.no_grad():
        router.balancer.bias.copy_(torch.randn(8, generator=torch.Generator().manual_seed(seed + 1)))
    after = route(layer, x).routing
    assert not torch.equal(before.topk_idx, after.topk_idx), "a large bias must change the selection"
    torch.testing.assert_close(after.scores, before.scores)  # scores carry no bias
    draft = RoutingDraft(x_TD=x[0], batch=routelab.TokenBatch.single_sequence(32), num_experts=8, top_k=2,
                         training=False, scores_TE=after.scores)
    expected = router.gate_norm(after.scores.gather(1, after.topk_idx.clamp_min(0)), after.topk_idx, draft)
    torch.testing.assert_close(after.topk_weight, expected)
