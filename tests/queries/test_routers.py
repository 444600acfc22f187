"""Routers on a toy task whose best model is written in the prompt, against hand-computed and
reference results (Bradley-Terry vs scikit-learn's unpenalised logistic fit, as RouteLLM)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from routelab.core.errors import ConfigError, InputError, UnknownNameError
from routelab.queries import QueryDataset, create_query_router, list_query_routers
from routelab.queries.evaluate import curve_of, evaluate_router, prepare
from routelab.queries.routers.elo import battle_wins, bradley_terry

TOPICS = {"algebra": 1, "integral": 1, "theorem": 1, "poem": 0, "novel": 0, "painting": 0}


def toy_dataset(n: int = 400, seed: int = 0) -> QueryDataset:
    """Model 'math-llm' (expensive) solves the maths prompts, 'chat-llm' (cheap) the arts prompts."""
    rng = np.random.default_rng(seed)
    rows = []
    words = list(TOPICS)
    for i in range(n):
        topic = words[rng.integers(len(words))]
        maths = TOPICS[topic]
        prompt = f"question {i} about the {topic} {topic} please"
        split = "train" if i < 0.7 * n else "test"
        for model, cost, good in (("chat-llm", 0.001, not maths), ("math-llm", 0.01, bool(maths))):
            score = float(good) if rng.random() > 0.05 else float(not good)
            rows.append({"query_id": f"q{i}", "prompt": prompt, "task": topic, "model": model, "score": score,
                         "cost_usd": cost, "split": split})
    return QueryDataset.from_long(pa.Table.from_pylist(rows), name="toy")


@pytest.fixture(scope="module")
def toy():
    return prepare(toy_dataset(), seed=0)


@pytest.mark.parametrize("name", ["knn", "mlp", "logistic", "mf", "sw-ranking"])
def test_learned_routers_find_the_right_model(toy, name):
    row, _ = evaluate_router(toy, name)
    oracle, _ = evaluate_router(toy, "oracle")
    best_single, _ = evaluate_router(toy, "best-single")
    # the topic decides the best model, so a learned router nearly matches the oracle
    assert row["best_quality"] > best_single["best_quality"] + 0.3
    assert row["best_quality"] > oracle["best_quality"] - 0.08
    assert row["apgr"] > 0.9 and row["cpt50"] < 0.45


def test_baselines(toy):
    cheapest, curve = evaluate_router(toy, "cheapest")
    test = toy.test
    assert all(c["cost_per_1k"] == pytest.approx(1.0) for c in curve)  # always the $0.001 model
    assert cheapest["best_quality"] == pytest.approx(test.score_QM[:, test.models.index("chat-llm")].mean())
    oracle, _ = evaluate_router(toy, "oracle")
    assert oracle["best_quality"] == pytest.approx(test.score_QM.max(axis=1).mean())
    assert oracle["oracle_gap"] == 0.0
    random_rows = [evaluate_router(prepare(toy.dataset, seed), "random")[0]["apgr"] for seed in range(3)]
    assert abs(np.mean(random_rows) - 0.5) < 0.15


def test_cascade_with_a_perfect_judge_by_hand(toy):
    router = create_query_router("cascade", judge_noise=0.0).fit(toy.context())
    points = router.operating_points(toy.test, toy.X_test)
    test = toy.test
    cheap, dear = test.models.index("chat-llm"), test.models.index("math-llm")
    at_one = next(p for p in points if p.param == 1.0)
    # threshold 1: keep the cheap answer exactly when it scored 1, else escalate and pay both
    keep = test.score_QM[:, cheap] == 1.0
    assert np.array_equal(at_one.choice_Q, np.where(keep, cheap, dear))
    np.testing.assert_allclose(at_one.paid_Q, np.where(keep, 0.001, 0.011))
    at_zero = points[0]
    assert (at_zero.choice_Q == cheap).all()


def test_bandits_learn_online_with_low_regret(toy):
    for name in ("linucb", "thompson"):
        row, curve = evaluate_router(toy, name)
        assert row["best_quality"] > 0.8
        assert row["regret_per_query_lambda0"] < 0.05  # vs the best fixed model, which scores ~0.5 here
    random_choice = evaluate_router(toy, "random")[0]
    assert random_choice["best_quality"] < 0.7


def test_bradley_terry_matches_unpenalised_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    target = rng.random((60, 3)).round(1)  # scores with ties
    wins = battle_wins(target)
    theta = bradley_terry(wins.sum(axis=0)[None])[0]
    # RouteLLM's compute_elo_mle_with_tie: every battle twice; a win = two wins, a tie = one win each
    X, y = [], []
    for n in range(len(target)):
        for i in range(3):
            for j in range(i + 1, 3):
                row = np.zeros(3)
                row[i], row[j] = 1.0, -1.0
                outcome = [1.0, 1.0] if target[n, i] > target[n, j] else [0.0, 0.0] if target[n, i] < target[n, j] \
                    else [1.0, 0.0]
                X += [row, row]
                y += outcome
    coef = LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-10, max_iter=1000).fit(np.array(X), y).coef_[0]
    np.testing.assert_allclose(theta - theta[0], coef - coef[0], atol=1e-5)


def test_registry_and_options():
    names = [r["name"] for r in list_query_routers()]
    assert names[:4] == ["random", "cheapest", "best-single", "oracle"]
    assert {"knn", "mlp", "logistic", "mf", "sw-ranking", "cascade", "linucb", "thompson"} <= set(names)
    with pytest.raises(UnknownNameError, match="Did you mean 'knn'"):
        create_query_router("knnn")
    with pytest.raises(ConfigError, match="unexpected keyword argument .kk.. Options: .*weighting"):
        create_query_router("knn", kk=3)
    with pytest.raises(ConfigError):
        create_query_router("mf", objective="nope")


def test_curve_costs_are_what_was_paid(toy):
    router = create_query_router("knn").fit(toy.context())
    points = router.operating_points(toy.test, toy.X_test)
    cost, quality = curve_of(points, toy.test)
    assert cost[0] >= cost[-1]  # lambda 0 first: the dearest operating point
    rows = np.arange(toy.test.num_queries)
    assert cost[3] == pytest.approx(toy.test.cost_QM[rows, points[3].choice_Q].mean())


def test_pluggable_embedders(tmp_path):
    from routelab.queries import CallableEmbedder, PrecomputedEmbedder
    from routelab.queries.embedders import SentenceTransformerEmbedder

    dataset = toy_dataset(200)

    def topic_vectors(prompts):
        return np.array([[float(word in p) for word in TOPICS] for p in prompts])

    prepared = prepare(dataset, 0, embedder_factory=lambda seed: CallableEmbedder(topic_vectors))
    row, _ = evaluate_router(prepared, "knn")
    assert row["best_quality"] >= prepared.test.score_QM.max(axis=1).mean() - 0.1
    vectors = dict(zip(dataset.query_ids, topic_vectors(dataset.prompts)))
    same = prepare(dataset, 0, embedder_factory=lambda seed: PrecomputedEmbedder(vectors))
    np.testing.assert_allclose(same.X_test, prepared.X_test)
    with pytest.raises(InputError, match="no precomputed vector"):
        PrecomputedEmbedder({}).transform(dataset)
    with pytest.raises(InputError, match="NaN"):
        CallableEmbedder(lambda prompts: np.full((len(prompts), 2), np.nan)).transform(dataset)
    with pytest.raises(ConfigError, match="never downloaded"):
        SentenceTransformerEmbedder(tmp_path / "no-such-model").fit(dataset)
