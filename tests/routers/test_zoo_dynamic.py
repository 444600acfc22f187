"""Dynamic-k routing: top-p (Huang, An et al. 2024), DynaMoE percentile gating and layer schedules."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import routelab
from routelab.core.context import TokenBatch
from routelab.routers.parts.router import RoutingDraft
from routelab.routers.families.dynamic import EntropyLoss, PercentileSelector, TopPSelector
from routelab.routers.families.dynamic import layer_capacity_factors, layer_top_k

P = [0.5, 0.3, 0.15, 0.05]


def draft_of(p_TE: torch.Tensor) -> RoutingDraft:
    p_TE = p_TE.float()
    return RoutingDraft(x_TD=torch.zeros(p_TE.shape[0], 1), batch=TokenBatch.single_sequence(p_TE.shape[0]),
                        num_experts=p_TE.shape[1], top_k=1, training=False, logits_TE=p_TE.log(), scores_TE=p_TE,
                        selection_scores_TE=p_TE)


def kept(selector, p) -> list[list[int]]:
    idx, _ = selector(draft_of(torch.tensor(p)))
    return [sorted(e for e in row if e >= 0) for row in idx.tolist()]


@pytest.mark.parametrize(("threshold", "expected"), [(0.4, [0]), (0.6, [0, 1]), (0.8, [0, 1, 2])])
def test_top_p_oracle_from_the_spec(threshold: float, expected: list[int]) -> None:
    selector = TopPSelector(4, threshold)
    idx, gates = selector(draft_of(torch.tensor([P])))
    assert kept(selector, [P]) == [expected]
    torch.testing.assert_close(gates[0, : len(expected)], torch.tensor(P[: len(expected)]))  # raw p, no renorm


def test_top_p_keeps_everything_when_no_prefix_exceeds_the_threshold_and_caps_with_max_experts() -> None:
    assert kept(TopPSelector(4, 1.0), [P]) == [[0, 1, 2, 3]]
    assert kept(TopPSelector(4, 0.8, max_k=2), [P]) == [[0, 1]]


@settings(max_examples=60, deadline=None)
@given(
    raw=st.lists(st.floats(0.01, 1.0), min_size=2, max_size=8),
    threshold=st.floats(0.05, 0.95),
)
def test_top_p_uses_exactly_the_smallest_prefix_with_mass_above_p(raw: list[float], threshold: float) -> None:
    p = torch.tensor(raw, dtype=torch.float64)
    p = p / p.sum()
    order = torch.argsort(p, descending=True, stable=True)
    cum = torch.cumsum(p[order], 0)
    assume(bool((cum - threshold).abs().min() > 1e-5))  # no boundary tie (float rounding decides ties)
    chosen = kept(TopPSelector(len(raw), threshold), [p.tolist()])[0]
    n = len(chosen)
    assert set(chosen) == set(order[:n].tolist()), "the kept experts are the most probable ones"
    assert float(cum[n - 1]) > threshold or n == len(raw), "mass of the kept set exceeds P"
    assert n == 1 or float(cum[n - 2]) <= threshold, "no smaller prefix has mass above P"


def test_top_p_preset_uses_softmax_probabilities_raw_gates_and_its_losses() -> None:
    router = routelab.create_router("top-p", d_model=4, num_experts=4)
    assert router.selector.threshold == 0.4 and router.gate_norm.mode == "none"
    assert {loss.name: loss.coef for loss in router.losses} == {"aux": 1e-2, "dynamic_entropy": 1e-4}
    routing = router(torch.randn(20, 4))
    valid = routing.topk_idx >= 0
    torch.testing.assert_close(routing.topk_weight[valid], routing.scores.gather(1, routing.topk_idx.clamp_min(0))[valid])


def test_entropy_loss_is_the_mean_shannon_entropy() -> None:
    p = torch.tensor([[0.25] * 4, [1.0, 0.0, 0.0, 0.0]])
    loss = EntropyLoss(1.0)(draft_of(p))
    torch.testing.assert_close(loss, torch.tensor(math.log(4) / 2))


def test_dynamoe_batch_percentile_oracle() -> None:
    # 16 probabilities; the 0.75-quantile (linear) sits at position 11.25 of the sorted values
    # [.1 x5, .2 x2, .25 x4, .3, .35 x2, .4, .7]: tau = .3 + .25 * (.35 - .3) = .3125.
    p = torch.tensor([[0.40, 0.30, 0.20, 0.10],
                      [0.70, 0.10, 0.10, 0.10],
                      [0.25, 0.25, 0.25, 0.25],
                      [0.35, 0.35, 0.20, 0.10]])
    selector = PercentileSelector(4, max_k=3, percentile=0.75)
    assert float(selector.threshold(p)) == pytest.approx(0.3125)
    torch.testing.assert_close(selector.threshold(p), torch.quantile(p, 0.75))
    # active: token0 {0} (.3 < tau); token1 {0}; token2 none -> clamped to its first; token3 {0, 1}
    assert kept(selector, p.tolist()) == [[0], [0], [0], [0, 1]]
    # the max_k clamp: with q = 0 every expert passes, but at most 3 are used
    assert (PercentileSelector(4, max_k=3, percentile=0.0)(draft_of(p))[0] >= 0).sum(dim=1).tolist() == [3, 3, 3, 3]
    token_scope = PercentileSelector(4, max_k=4, percentile=0.5, scope="token")
    torch.testing.assert_close(token_scope.threshold(p), torch.quantile(p, 0.5, dim=1, keepdim=True))


def test_dynamoe_preset_token_scope_and_renormalised_gates() -> None:
    router = routelab.create_router("dynamoe", d_model=6, num_experts=8, top_k=3, percentile_scope="token",
                                    percentile=0.5)
    routing = router(torch.randn(30, 6))
    counts = (routing.topk_idx >= 0).sum(dim=1)
    assert int(counts.min()) >= 1 and int(counts.max()) <= 3
    torch.testing.assert_close(routing.topk_weight.sum(dim=1), torch.ones(30))


def test_layer_schedules() -> None:
    assert layer_top_k("descending", 4, 1, 4) == [4, 3, 2, 1]
    assert layer_top_k("ascending", 4, 1, 4) == [1, 2, 3, 4]
    assert layer_top_k("uniform", 3, 1, 4) == [4, 4, 4]
    assert layer_top_k("pyramid", 5, 1, 3) == [1, 2, 3, 2, 1]
    assert layer_top_k("inverse-pyramid", 5, 1, 3) == [3, 2, 1, 2, 3]
    assert layer_top_k("wave", 5, 1, 3) == [2, 3, 2, 1, 2]
    assert layer_top_k("descending", 1, 2, 8) == [8]
    assert layer_capacity_factors("ascending", 3, 1.0, 2.0) == [1.0, 1.5, 2.0]


def test_schedule_builds_per_layer_routers() -> None:
    ks = layer_top_k("descending", 3, 1, 3)
    layers = [routelab.MoE(d_model=8, d_hidden=8, num_experts=4, top_k=k, router="dynamoe") for k in ks]
    assert [layer.router.selector.max_k for layer in layers] == [3, 2, 1]


def test_bad_options_are_refused_with_the_argument_named() -> None:
    with pytest.raises(routelab.ConfigError, match="top_p"):
        routelab.create_router("top-p", d_model=4, num_experts=4, top_p=0.0)
    with pytest.raises(routelab.ConfigError, match="max_experts"):
        routelab.create_router("top-p", d_model=4, num_experts=4, max_experts=9)
    with pytest.raises(routelab.ConfigError, match="percentile"):
        routelab.create_router("dynamoe", d_model=4, num_experts=4, percentile=1.0)
    with pytest.raises(routelab.ConfigError, match="percentile_scope"):
        routelab.create_router("dynamoe", d_model=4, num_experts=4, percentile_scope="layer")
    with pytest.raises(routelab.ConfigError, match="schedule"):
        layer_top_k("zigzag", 4, 1, 4)
    with pytest.raises(routelab.ConfigError, match="k_min"):
        layer_top_k("descending", 4, 5, 4)
    with pytest.raises(routelab.ConfigError, match="num_layers"):
        layer_top_k("descending", 0, 1, 4)
