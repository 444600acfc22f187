"""Metrics over traces: hand-computed oracles and small brute-force references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from routelab.core.errors import ConfigError, InputError
from routelab.metrics import (
    activation_rate_difference,
    balance_metrics,
    cache_hit_curve,
    chunk_level_sparsity,
    coactivation_matrix,
    conditional_coactivation,
    domain_distributions,
    domain_divergence,
    expert_domain_specialization,
    fluctuation_between,
    gini,
    jensen_shannon,
    layer_balance,
    layer_transition_counts,
    mutual_information,
    segment_cache_hit_rates,
    segment_routing_performance,
    srp_from_histogram,
    stablemoe_fluctuation,
    token_level_sparsity,
    top1_experts,
    topk_flip_rate,
    topk_jaccard,
    vocabulary_specialization,
)
from routelab.metrics.locality import model_level_ids
from routelab.traces import InMemoryTrace


# ------------------------------------------------------------------ balance
def test_balance_oracle_4_2_1_1():
    m = balance_metrics(np.array([4, 2, 1, 1]))
    assert m["max_vio"] == pytest.approx(1.0)
    assert m["cv"] == pytest.approx(0.6124, abs=1e-4)
    assert m["entropy"] == pytest.approx(0.875)
    assert m["gini"] == pytest.approx(0.3125)  # sum|ci-cj| = 20 over ordered pairs / (2*16*2)
    assert m["min_max_ratio"] == pytest.approx(0.25) and m["dead_experts"] == 0


def test_gini_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = rng.integers(0, 20, size=rng.integers(1, 9))
        if c.sum() == 0:
            continue
        pairwise = np.abs(c[:, None] - c[None, :]).sum() / (2 * len(c) ** 2 * c.mean())
        assert gini(c) == pytest.approx(pairwise)


def test_layer_balance_global_vs_per_batch():
    # Each half of the trace uses one expert only: every batch is maximally unbalanced,
    # the whole set is perfectly balanced.
    idx = np.array([[0]] * 4 + [[1]] * 4)
    trace = InMemoryTrace.from_arrays([idx, idx], 2)
    report = layer_balance(trace, batch_tokens=4)
    np.testing.assert_allclose(report.per_layer["max_vio"], [0, 0])
    np.testing.assert_allclose(report.per_batch["max_vio"], [1, 1])
    np.testing.assert_allclose(report.per_batch["dead_experts"], [1, 1])
    np.testing.assert_array_equal(report.loads, [[4, 4], [4, 4]])
    assert report.percentiles()["cv"]["p50"] == 0
    with pytest.raises(ConfigError, match="batch_tokens"):
        layer_balance(trace).percentiles(local=True)


# ------------------------------------------------------------------ fluctuation
def test_stablemoe_oracle():
    result = stablemoe_fluctuation(np.array([[0], [1], [1], [1]]))
    np.testing.assert_array_equal(result.last_step, [0])
    np.testing.assert_allclose(result.flip_rates, [1, 0, 0])
    assert result.progress[result.last_step[0]] == 0.0  # 0 % of training
    assert result.fluctuating_after(0.0) == 0.0


def test_stablemoe_curve_and_steps():
    top1 = np.array([[0, 1, 2], [1, 1, 2], [1, 0, 2], [1, 1, 2]])
    result = stablemoe_fluctuation(top1, steps=[100, 200, 300, 400])
    np.testing.assert_array_equal(result.last_step, [0, 2, -1])
    assert result.fluctuating_after(0.5) == pytest.approx(1 / 3)  # token 1 last moved at 75 %
    progress, settled = result.cumulative_curve()
    np.testing.assert_allclose(progress, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(settled, [2 / 3, 2 / 3, 1, 1])


def test_topk_flip_rate_and_jaccard():
    a = np.array([[0, 1], [2, 3], [0, -1], [-1, -1]])
    b = np.array([[1, 0], [2, 4], [1, 2], [-1, -1]])
    # per token: flip 0, 1/2, 1, 0 ; jaccard 1, 1/3, 0, 1
    assert topk_flip_rate(a, b) == pytest.approx((0 + 0.5 + 1 + 0) / 4)
    assert topk_jaccard(a, b) == pytest.approx((1 + 1 / 3 + 0 + 1) / 4)
    assert topk_flip_rate(a[:, :1], b[:, :1]) == pytest.approx(2 / 4)  # top-1: 0/1, 2/2, 0/1, empty


def test_top1_uses_largest_weight():
    idx = np.array([[3, 5], [1, 2], [-1, 4]])
    w = np.array([[0.2, 0.8], [0.5, 0.5], [0.0, 1.0]])
    np.testing.assert_array_equal(top1_experts(idx, w), [5, 1, 4])
    np.testing.assert_array_equal(top1_experts(idx), [3, 1, 4])


def test_fluctuation_between_traces_checks_tokens():
    a = InMemoryTrace.from_arrays([np.array([[0, 1], [2, 3]])], 4, token_id=np.array([5, 6]))
    b = InMemoryTrace.from_arrays([np.array([[1, 0], [2, 0]])], 4, token_id=np.array([5, 6]),
                                  topk_weight=[np.array([[0.9, 0.1], [0.6, 0.4]])])
    result = fluctuation_between(a, b)
    np.testing.assert_allclose(result.flip_rate, [0.25])
    np.testing.assert_allclose(result.top1_flip_rate, [0.5])  # token 0: 0 vs 1; token 1: 2 vs 2
    c = InMemoryTrace.from_arrays([np.array([[1, 0], [2, 0]])], 4, token_id=np.array([5, 7]))
    with pytest.raises(InputError, match="same tokens"):
        fluctuation_between(a, c)


# ------------------------------------------------------------------ SRP
def brute_force_srp(ids, num_experts, window, offsets):
    counts = []
    for s in range(len(offsets) - 1):
        seg = ids[offsets[s] : offsets[s + 1]]
        for w in range(len(seg) - window + 1):
            for e in range(num_experts):
                counts.append(int((seg[w : w + window] == e).any(axis=1).sum()))
    counts = np.array(counts)
    f1 = []
    for theta in range(window + 1):
        sel = counts >= theta
        matches, preds, acts = counts[sel].sum(), window * sel.sum(), counts.sum()
        f1.append(2 * matches / max(preds + acts, 1))
    return max(f1), int(np.argmax(f1))


def test_srp_spec_oracle():
    trace = InMemoryTrace.from_arrays([np.array([[0], [0], [1], [0]])], 4)
    w2, w4 = segment_routing_performance(trace, windows=[2, 4])
    np.testing.assert_allclose(w2.f1, [0.40, 0.75, 0.50])
    assert (w2.srp, w2.theta) == (pytest.approx(0.75), 1)
    assert (w4.srp, w4.theta) == (pytest.approx(0.75), 2)
    assert w2.f1[0] == pytest.approx(2 * 1 / (4 + 1))  # θ = 0 gives 2k/(E+k)
    assert w2.act_r == pytest.approx(1 / 4)  # k / E


def test_srp_levels_against_brute_force():
    rng = np.random.default_rng(3)
    layers = [np.stack([rng.permutation(5)[:2] for _ in range(30)]) for _ in range(2)]
    seq = np.repeat([0, 1, 2], [12, 3, 15])
    trace = InMemoryTrace.from_arrays(layers, 5, seq_id=seq)
    offsets = trace.sequence_offsets()
    per_layer = segment_routing_performance(trace, windows=[4], level="layer")
    for layer, result in zip((0, 1), per_layer):
        assert (result.srp, result.theta) == pytest.approx(brute_force_srp(layers[layer], 5, 4, offsets))
    (model,) = segment_routing_performance(trace, windows=[4], level="model")
    pooled = brute_force_srp(np.concatenate(layers), 5, 4, np.concatenate([offsets, offsets[1:] + 30]))
    assert (model.srp, model.theta) == pytest.approx(pooled)
    experts = segment_routing_performance(trace, windows=[4], level="expert")
    assert len(experts) == 10
    only = np.where((layers[1] == 3).any(axis=1), 0, -1)[:, None]
    assert experts[8].srp == pytest.approx(brute_force_srp(only, 1, 4, offsets)[0])


def test_srp_bootstrap_interval_contains_estimate_and_is_reproducible():
    rng = np.random.default_rng(1)
    ids = np.stack([rng.permutation(6)[:2] for _ in range(400)])
    trace = InMemoryTrace.from_arrays([ids], 6, seq_id=np.repeat(np.arange(20), 20))
    (a,) = segment_routing_performance(trace, windows=[4], bootstrap=200, seed=5)
    (b,) = segment_routing_performance(trace, windows=[4], bootstrap=200, seed=5)
    assert a.ci == b.ci and a.ci[0] <= a.srp <= a.ci[1] and a.ci[1] - a.ci[0] < 0.2


def test_srp_from_histogram_rejects_wrong_bins():
    with pytest.raises(InputError, match="window\\+1"):
        srp_from_histogram(np.zeros(3), 4)


# ------------------------------------------------------------------ SCH
def test_sch_and_baselines_oracle_table():
    trace = InMemoryTrace.from_arrays([np.array([[0], [1], [2], [0], [1], [2], [3], [0]])], 4)
    curves = segment_cache_hit_rates(trace, future_lens=[1, 2, 4], sequence_stride=1)
    table = {(c.policy, c.future_len): c.hit_rate for c in curves}
    np.testing.assert_allclose(table["lru", None], [0.125, 0.25, 0.75, 1])
    np.testing.assert_allclose(table["lfu", None], [0.125, 0.25, 0.75, 1])
    np.testing.assert_allclose(table["belady", None], [0.125, 0.5, 0.875, 1])
    np.testing.assert_allclose(table["sch", 1], [0.125, 0.25, 0.75, 1])
    np.testing.assert_allclose(table["sch", 2], [0.125, 0.5, 0.875, 1])
    np.testing.assert_allclose(table["sch", 4], [0.125, 0.375, 0.875, 1])
    assert curves[0].at(2) == 0.25 and curves[0].cache_multiple[1] == 2.0


def test_model_level_sch_pools_layers_with_offsets():
    l0 = np.array([[0], [1], [0]])
    l1 = np.array([[1], [1], [0]])
    trace = InMemoryTrace.from_arrays([l0, l1], 2)
    np.testing.assert_array_equal(model_level_ids(trace), [[0, 3], [1, 3], [0, 2]])
    curves = segment_cache_hit_rates(trace, future_lens=[2], baselines=["lru"], level="model", sequence_stride=1)
    assert curves[0].capacity_unit == 2 and len(curves[0].hit_rate) == 4
    direct = cache_hit_curve(model_level_ids(trace), 4, "lru", np.array([0, 3]))
    np.testing.assert_allclose(curves[1].hit_rate, direct.hit_rate)


def test_sequence_stride_replays_every_nth_sequence_with_fresh_caches():
    rng = np.random.default_rng(2)
    ids = np.stack([rng.permutation(4)[:1] for _ in range(40)])
    seq = np.repeat(np.arange(8), 5)
    trace = InMemoryTrace.from_arrays([ids], 4, seq_id=seq)
    (curve,) = segment_cache_hit_rates(trace, future_lens=[], baselines=["lru"], sequence_stride=3)
    kept = ids[np.isin(seq, [0, 3, 6])]
    expected = cache_hit_curve(kept, 4, "lru", np.array([0, 5, 10, 15]))
    np.testing.assert_allclose(curve.hit_rate, expected.hit_rate)
    assert curve.accesses == 15


def test_cache_curve_bootstrap_interval():
    rng = np.random.default_rng(4)
    ids = np.stack([rng.permutation(8)[:2] for _ in range(600)])
    curve = cache_hit_curve(ids, 8, "lru", np.arange(0, 601, 20), bootstrap=100, seed=1)
    assert (curve.ci_low <= curve.hit_rate + 1e-12).all() and (curve.hit_rate <= curve.ci_high + 1e-12).all()
    assert curve.ci_high[-1] == pytest.approx(1.0)


# ------------------------------------------------------------------ sparsity
def test_tls_cls_oracle():
    idx = np.array([[0], [0], [1], [0]])
    assert token_level_sparsity(idx, 4) == pytest.approx(0.75)
    assert chunk_level_sparsity(idx, 4, np.array([0, 4]), 4) == pytest.approx(0.5)
    assert chunk_level_sparsity(idx, 4, np.array([0, 4]), 4, sliding=True) == pytest.approx(0.5)
    assert chunk_level_sparsity(idx, 4, np.array([0, 4]), 1) == pytest.approx(0.75)  # W = 1 is TLS


def test_cls_chunks_stay_inside_sequences():
    idx = np.array([[0], [1], [2], [3], [0], [0]])
    offsets = np.array([0, 3, 6])  # sequences [0,1,2] and [3,0,0]; W=2 full chunks: {0,1}, {3,0}
    assert chunk_level_sparsity(idx, 4, offsets, 2) == pytest.approx(1 - 4 / 8)
    # sliding windows: {0,1},{1,2},{3,0},{0} -> 7 active of 16
    assert chunk_level_sparsity(idx, 4, offsets, 2, sliding=True) == pytest.approx(1 - 7 / 16)


# ------------------------------------------------------------------ specialization
def test_jsd_oracles_and_normalisations():
    assert jensen_shannon([1, 0], [0, 1]) == pytest.approx(0.6931, abs=1e-4)
    assert jensen_shannon([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.1017, abs=1e-4)
    assert jensen_shannon([1, 0], [0, 1], normalize="ln2") == pytest.approx(1.0)
    h = 0.5 * (np.log(2) + -(0.9 * np.log(0.9) + 0.1 * np.log(0.1)))
    assert jensen_shannon([0.5, 0.5], [0.9, 0.1], normalize="entropy") == pytest.approx(0.10175 / h, abs=1e-4)
    assert jensen_shannon([2, 2], [1, 1]) == 0.0
    with pytest.raises(ConfigError):
        jensen_shannon([1], [1], normalize="bits")


def domain_trace():
    # domain a (tokens 0-3) always expert 0 (+1 in slot 2); domain b (tokens 4-7) expert 2 (+1)
    idx = np.array([[0, 1]] * 4 + [[2, 1]] * 4)
    weight = np.array([[0.75, 0.25]] * 8)
    return InMemoryTrace.from_arrays([idx], 3, topk_weight=[weight], domain=["a"] * 4 + ["b"] * 4,
                                     token_id=np.array([7, 7, 8, 8, 7, 7, 9, 9]))


def test_domain_distributions_divergence_and_mi():
    trace = domain_trace()
    np.testing.assert_allclose(domain_distributions(trace, 0), [[0.5, 0.5, 0], [0, 0.5, 0.5]])
    np.testing.assert_allclose(domain_distributions(trace, 0, weighting="weight"), [[0.75, 0.25, 0], [0, 0.25, 0.75]])
    div = domain_divergence(trace, 0)
    assert div[0, 0] == 0 and div[0, 1] == pytest.approx(jensen_shannon([0.5, 0.5, 0], [0, 0.5, 0.5]))
    # joint over assignments: P(a,0)=P(a,1)=P(b,1)=P(b,2)=1/4 -> I = H(domain) - H(domain|expert) = ln2 - ln2/2
    mi, normalised = mutual_information(trace.tokens().domain, trace.topk_idx(0), 3)
    assert mi == pytest.approx(np.log(2) / 2) and normalised == pytest.approx(0.5)
    np.testing.assert_allclose(expert_domain_specialization(trace, 0), [1.0, 0.5, 1.0])
    a, b = trace.select(domain="a"), trace.select(domain="b")
    np.testing.assert_allclose(activation_rate_difference(a, b, 0), [1, 0, -1])


def test_mutual_information_matches_definition():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 50)
    idx = rng.integers(0, 4, (50, 1))
    joint = np.zeros((3, 4))
    for lab, e in zip(labels, idx[:, 0]):
        joint[lab, e] += 1
    joint /= joint.sum()
    expected = sum(joint[i, j] * np.log(joint[i, j] / (joint[i].sum() * joint[:, j].sum()))
                   for i, j in itertools.product(range(3), range(4)) if joint[i, j] > 0)
    assert mutual_information(labels, idx, 4)[0] == pytest.approx(expected)


def test_vocabulary_specialization():
    trace = domain_trace()
    vocab = vocabulary_specialization(trace, 0, min_count=2)
    np.testing.assert_array_equal(vocab.token_ids, [7, 8, 9])
    np.testing.assert_array_equal(vocab.counts, [4, 2, 2])
    # token 7: experts 0,1,0,1,2,1,2,1 -> expert 1 takes 4/8; token 8: 0 and 1 tie -> 0 first
    np.testing.assert_array_equal(vocab.top_expert, [1, 0, 1])
    np.testing.assert_allclose(vocab.top_share, [0.5, 0.5, 0.5])
    assert vocabulary_specialization(trace, 0, min_count=3).token_ids.tolist() == [7]


def test_domain_metrics_need_domains():
    trace = InMemoryTrace.from_arrays([np.array([[0]])], 2)
    with pytest.raises(InputError, match="no domain labels"):
        domain_distributions(trace, 0)


# ------------------------------------------------------------------ co-activation
def test_coactivation_and_transitions():
    l0 = np.array([[0, 1], [0, 2], [1, -1]])
    l1 = np.array([[2, -1], [2, 0], [1, 2]])
    co = coactivation_matrix(l0, 3)
    np.testing.assert_array_equal(co, [[2, 1, 1], [1, 2, 0], [1, 0, 1]])
    np.testing.assert_allclose(conditional_coactivation(co)[0], [1, 0.5, 0.5])
    dense0 = np.zeros((3, 3))
    dense1 = np.zeros((3, 3))
    for t in range(3):
        dense0[t, l0[t][l0[t] >= 0]] = 1
        dense1[t, l1[t][l1[t] >= 0]] = 1
    np.testing.assert_array_equal(layer_transition_counts(l0, l1, 3), dense0.T @ dense1)


def test_cache_unit_is_mean_active_experts_for_variable_k():
    from routelab.metrics.locality import active_experts

    idx = np.array([[0, 1, -1, -1], [2, -1, -1, -1], [0, 1, 2, 3]] * 4)  # 7/3 experts per token
    trace = InMemoryTrace.from_arrays([idx, idx], 4)
    assert trace.k_max == 4 and active_experts(trace) == 2
    curves = segment_cache_hit_rates(trace, future_lens=[2], baselines=[], sequence_stride=1)
    assert curves[0].capacity_unit == 2 and curves[0].cache_multiple[3] == 2.0
