"""AIQ, hull, APGR and CPT on hand-computed curves; the random router's APGR is 0.5 on average."""

from __future__ import annotations

import numpy as np
import pytest

from routelab.core.errors import InputError
from routelab.queries import load_dataset
from routelab.queries.metrics import (
    SharePoint,
    aiq,
    apgr,
    bandit_regret,
    cpt,
    decile_thresholds,
    hull_quality_at,
    oracle_share_quality,
    strong_share_curve,
    upper_hull,
)


def test_upper_hull_and_aiq_by_hand():
    cost = np.array([0.0, 1.0, 2.0, 1.0, 3.0, 1.5])
    quality = np.array([0.0, 1.0, 1.5, 0.2, 1.2, 0.9])
    np.testing.assert_array_equal(upper_hull(cost, quality), [[0, 0], [1, 1], [2, 1.5]])
    # area: 0.5 (0->1) + 1.25 (1->2) + 3.0 (flat 2->4); / c_max 4
    assert aiq(cost, quality, c_max=4.0) == pytest.approx(4.75 / 4)
    # a point inside the hull's chord is dropped (mixing the two ends beats it)
    np.testing.assert_array_equal(upper_hull([0, 1, 2], [0, 0.4, 1]), [[0, 0], [2, 1]])
    # the area starts at the cheapest point, as RouterBench's
    assert aiq([1.0, 2.0], [0.5, 1.0], c_max=2.0) == pytest.approx(0.75 / 2)
    # a hull longer than the window is cut at c_max (interpolated)
    assert aiq([0.0, 2.0], [0.0, 1.0], c_max=1.0) == pytest.approx(0.25)
    assert hull_quality_at([0.0, 2.0], [0.0, 1.0], [1.0, 3.0]).tolist() == [0.5, 1.0]
    with pytest.raises(InputError):
        aiq([0.0], [1.0], c_max=0.0)


def test_apgr_and_cpt_by_hand():
    points = [SharePoint(0, 0.0, 0.60), SharePoint(0, 0.5, 0.75), SharePoint(0, 1.0, 0.80)]
    # AUC = 0.5 (0.60 + 0.75) / 2 + 0.5 (0.75 + 0.80) / 2 = 0.725; (0.725 - 0.6) / (0.8 - 0.6)
    assert apgr(points, 0.6, 0.8) == pytest.approx(0.625)
    # 50% of the gap = 0.70: a third of the way to 0.75 at share 0.5
    assert cpt(points, 0.6, 0.8, 0.5) == pytest.approx(1 / 3)
    # 80% = 0.76: a fifth of the way from 0.75 to 0.80, between shares 0.5 and 1
    assert cpt(points, 0.6, 0.8, 0.8) == pytest.approx(0.6)
    assert cpt(points, 0.6, 0.8, 0.8, method="first") == pytest.approx(0.6)
    # a curve that overshoots and comes back: the first crossing
    bumpy = [SharePoint(0, 0.0, 0.60), SharePoint(0, 0.5, 0.85), SharePoint(0, 1.0, 0.80)]
    assert cpt(bumpy, 0.6, 0.8, 0.8, method="first") == pytest.approx(0.16 / 0.25 * 0.5)
    # APGR of the straight line between weak and strong (random routing in expectation) is 0.5
    line = [SharePoint(0, s, 0.6 + 0.2 * s) for s in np.linspace(0, 1, 11)]
    assert apgr(line, 0.6, 0.8) == pytest.approx(0.5)


def routellm_reference_curve(scores, strong_q, weak_q):
    """RouteLLM's benchmark loop, written out: 11 linear-quantile edges; >= at every edge but the last."""
    edges = [np.quantile(scores, q) for q in np.linspace(0, 1, 11)]
    out = []
    for i, t in enumerate(edges):
        chosen = [s > t if i == 10 else s >= t for s in scores]
        quality = np.mean([a if c else b for c, a, b in zip(chosen, strong_q, weak_q)])
        out.append((float(np.mean(chosen)), float(quality)))
    return sorted(out)


def test_strong_share_curve_matches_routellm_loop():
    rng = np.random.default_rng(3)
    scores = rng.random(500)
    strong_q, weak_q = (rng.random(500) < 0.8).astype(float), (rng.random(500) < 0.6).astype(float)
    ours = [(p.strong_share, p.quality) for p in strong_share_curve(scores, strong_q, weak_q)]
    np.testing.assert_allclose(np.array(ours), np.array(routellm_reference_curve(scores, strong_q, weak_q)))
    assert decile_thresholds(np.zeros(100)).tolist() == [0.0]  # equal edges dropped (pd.qcut would raise)


def test_random_router_apgr_is_one_half_on_average():
    mmlu = load_dataset("routellm-mmlu")
    strong, weak = mmlu.strong_weak()
    strong_q, weak_q = mmlu.score_QM[:, strong], mmlu.score_QM[:, weak]
    values = []
    for seed in range(20):
        scores = np.random.default_rng(seed).random(mmlu.num_queries)
        values.append(apgr(strong_share_curve(scores, strong_q, weak_q), weak_q.mean(), strong_q.mean()))
    assert np.mean(values) == pytest.approx(0.5, abs=0.01)
    assert np.std(values) < 0.03


def test_oracle_share_quality_is_routellm_optimal_accuracy():
    mmlu = load_dataset("routellm-mmlu")
    strong, weak = mmlu.strong_weak()
    s, w = mmlu.score_QM[:, strong], mmlu.score_QM[:, weak]
    for share in (0.0, 0.1, 0.178, 0.5, 1.0):
        calls = int(share * len(s))
        routellm = (w.sum() + min(calls, int(((w == 0) & (s == 1)).sum()))) / len(s)
        assert oracle_share_quality(mmlu.score_QM, strong, weak, share) == pytest.approx(routellm)


def test_bandit_regret_against_best_fixed_model():
    reward = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    regret, best = bandit_regret(reward, np.array([1, 1, 0, 0]))
    assert (best, regret) == (0, 3.0 - 3.0)
    regret, _ = bandit_regret(reward, np.array([1, 0, 1, 1]))
    assert regret == 3.0
