"""Decision rules: calibration reaches its target on held-out data, budgets hold, fallbacks say why;
the price registry is strict; user tables load in every format."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from routelab.core.errors import ConfigError, InputError
from routelab.queries import (
    CostConvention,
    PriceRegistry,
    QueryDataset,
    RoutingPolicy,
    TfidfSvdEmbedder,
    calibrate_budget,
    calibrate_lambda,
    calibrate_share,
    create_query_router,
    load_dataset,
    load_table,
)
from routelab.queries.base import FitContext, ScoreScale, utility_choice


def fitted(router_name: str, dataset: QueryDataset, embed_dim: int = 16):
    embedder = TfidfSvdEmbedder(dim=embed_dim, max_features=5000).fit(dataset)
    X = embedder.transform(dataset)
    scale = ScoreScale.fit(dataset.score_QM)
    cost = dataset.mean_costs()
    router = create_query_router(router_name).fit(FitContext(dataset, X, scale(dataset.score_QM), cost / cost.max(),
                                                              scale, 0))
    return router, embedder


@pytest.fixture(scope="module")
def mmlu_parts():
    mmlu = load_dataset("routellm-mmlu")
    train = mmlu.part("train")
    order = np.random.default_rng(0).permutation(train.num_queries)  # a subset keeps the test fast
    fit, held_out = train.subset(np.sort(order[:2500])), train.subset(np.sort(order[2500:5000]))
    router, embedder = fitted("logistic", fit)
    test = mmlu.part("test")  # rows are grouped by subject: a random subset, not the first rows
    return router, embedder, held_out, test.subset(np.sort(np.random.default_rng(1).permutation(test.num_queries)[:2500]))


def test_calibrated_share_holds_on_test(mmlu_parts):
    router, embedder, held_out, test = mmlu_parts
    strong, weak = held_out.strong_weak()
    val_scores = router.strong_scores(held_out, embedder.transform(held_out), strong, weak)
    test_scores = router.strong_scores(test, embedder.transform(test), strong, weak)
    for target in (0.2, 0.5, 0.8):
        calibration = calibrate_share(val_scores, target)
        assert calibration.achieved == pytest.approx(target, abs=0.002)  # on the held-out sample itself
        assert calibration.strong(test_scores).mean() == pytest.approx(target, abs=0.03)  # on unseen queries


def test_calibrated_budget_holds_on_test(mmlu_parts):
    router, embedder, held_out, test = mmlu_parts
    strong, weak = held_out.strong_weak()
    val_scores = router.strong_scores(held_out, embedder.transform(held_out), strong, weak)
    test_scores = router.strong_scores(test, embedder.transform(test), strong, weak)
    budget = 3.0  # dollars per 1,000 queries: about a third of GPT-4 calls at the nominal 359 tokens
    calibration = calibrate_budget(val_scores, held_out.cost_QM[:, strong], held_out.cost_QM[:, weak], budget)
    assert calibration.achieved <= budget and calibration.achieved > 0.95 * budget
    spent = np.where(calibration.strong(test_scores), test.cost_QM[:, strong], test.cost_QM[:, weak]).mean() * 1000
    assert spent == pytest.approx(budget, rel=0.1)
    with pytest.raises(ConfigError, match="below the cost of always calling the weak model"):
        calibrate_budget(val_scores, held_out.cost_QM[:, strong], held_out.cost_QM[:, weak], 0.01)


def test_calibration_by_hand():
    scores = np.arange(100, dtype=float)
    share = calibrate_share(scores, 0.3)
    assert share.threshold == pytest.approx(69.3) and share.achieved == pytest.approx(0.3)
    assert calibrate_share(scores, 0.0).achieved == 0.0 and calibrate_share(scores, 1.0).achieved == 1.0
    # four queries, strong $3 / weak $1; $2,000 per 1k allows the two highest-scoring queries on strong
    budget = calibrate_budget(np.array([0.9, 0.1, 0.5, 0.7]), np.full(4, 3.0), np.full(4, 1.0), 2000.0)
    assert (budget.threshold, budget.achieved) == (0.7, 2000.0)
    # ties: both 0.5s go together or not at all
    tied = calibrate_budget(np.array([0.5, 0.5, 0.1]), np.full(3, 3.0), np.full(3, 1.0), 2000.0)
    assert tied.strong(np.array([0.5, 0.5, 0.1])).sum() == 0
    with pytest.raises(ConfigError):
        calibrate_share(scores, 1.5)


def test_calibrate_lambda_keeps_budget():
    score_hat = np.array([[0.2, 0.9], [0.5, 0.6], [0.1, 0.7]])  # strong-model gains 0.7, 0.1, 0.6
    cost = np.array([[1.0, 10.0]] * 3) / 1000  # $1 and $10 per 1,000 calls
    # $4/1k: one strong call ((10 + 1 + 1) / 3 = 4), the largest gain
    lam, spent = calibrate_lambda(score_hat, cost, np.array([0.1, 1.0]), budget_per_1k=4.0)
    assert spent == pytest.approx(4.0) and utility_choice(score_hat, np.array([0.1, 1.0]), lam).tolist() == [1, 0, 0]
    lam, spent = calibrate_lambda(score_hat, cost, np.array([0.1, 1.0]), budget_per_1k=8.0)
    assert spent == pytest.approx(7.0) and utility_choice(score_hat, np.array([0.1, 1.0]), lam).tolist() == [1, 0, 1]
    assert calibrate_lambda(score_hat, cost, np.array([0.1, 1.0]), budget_per_1k=100.0) == (0.0, 10.0)


def test_utility_ties_go_to_the_cheaper_model():
    assert utility_choice(np.array([[0.5, 0.5, 0.5]]), np.array([0.9, 0.2, 1.0]), 0.0).tolist() == [1]


def test_policy_always_decides_and_says_why():
    gsm = load_dataset("routellm-gsm8k").part("train")
    router, embedder = fitted("knn", gsm)
    policy = RoutingPolicy(router, embedder, gsm.models, ("utility", 0.1), fallback=gsm.models[0])
    decisions = policy.route(["", "Tom has 3 apples and buys 4 more. How many apples does he have?", "   "])
    assert decisions[0].model == gsm.models[0] and decisions[0].reason.startswith("fallback: empty prompt")
    assert decisions[1].model in gsm.models and decisions[1].reason.startswith("utility")
    assert decisions[2].reason.startswith("fallback")
    calibration = calibrate_share(np.linspace(0, 1, 11), 0.5)
    threshold_policy = RoutingPolicy(router, embedder, gsm.models, ("threshold", calibration), fallback=gsm.models[0])
    assert threshold_policy.route(["How many eggs are left?"])[0].reason.startswith("threshold")

    class Broken(type(router)):
        def predict(self, dataset, X_QD):
            return np.full((len(X_QD), 2), np.nan)

    broken = Broken().fit(router.context)
    decision = RoutingPolicy(broken, embedder, gsm.models, ("utility", 0.0), gsm.models[1]).route(["a question"])[0]
    assert decision.model == gsm.models[1] and "non-finite" in decision.reason
    with pytest.raises(ConfigError):
        RoutingPolicy(router, embedder, gsm.models, ("utility", 0.1), fallback="not-a-model")


def test_unpriced_model_is_an_error_never_zero(tmp_path):
    registry = PriceRegistry()
    with pytest.raises(InputError, match="no price"):
        registry.price("my-new-llm")
    rows = [{"query_id": "q1", "model": "gpt-4-1106-preview", "score": 1.0, "in_tokens": 100, "out_tokens": 10},
            {"query_id": "q1", "model": "my-new-llm", "score": 0.0, "in_tokens": 100, "out_tokens": 10}]
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    with pytest.raises(InputError, match="my-new-llm"):
        QueryDataset.from_long(table)
    registry.add("my-new-llm", 1.0, 2.0, "my contract")
    dataset = QueryDataset.from_long(table, prices=registry)
    assert dataset.cost_QM[0].tolist() == pytest.approx([(100 * 10 + 10 * 30) / 1e6, (100 * 1 + 10 * 2) / 1e6])
    # no cost and no tokens: an error unless a nominal-token convention is given, and then it is stated
    bare = pa.Table.from_pylist([{"query_id": "q", "model": m, "score": 0.5} for m in ("gemma-2-9b-it", "codegemma-7b")])
    with pytest.raises(InputError, match="never assumed"):
        QueryDataset.from_long(bare)
    convention = CostConvention(100, 100, "100 + 100 nominal tokens")
    assert QueryDataset.from_long(bare, cost_convention=convention).cost_convention == "100 + 100 nominal tokens"


def test_user_tables_load_in_every_format(tmp_path):
    gsm = load_dataset("routellm-gsm8k")
    small = gsm.subset(np.arange(40))
    table = small.to_long()
    pq.write_table(table, tmp_path / "mine.parquet")
    import pyarrow.csv as pacsv

    pacsv.write_csv(table, tmp_path / "mine.csv")
    import json

    with (tmp_path / "mine.jsonl").open("w") as handle:
        for row in table.to_pylist():
            handle.write(json.dumps(row) + "\n")
    for suffix in ("parquet", "csv", "jsonl"):
        loaded = load_table(tmp_path / f"mine.{suffix}")
        assert loaded.models == small.models
        np.testing.assert_array_equal(loaded.score_QM, small.score_QM)
        np.testing.assert_allclose(loaded.cost_QM, small.cost_QM)
        assert loaded.prompts == small.prompts and loaded.split.tolist() == small.split.tolist()
    with pytest.raises(InputError, match="must end in"):
        load_table(tmp_path / "mine.txt") if (tmp_path / "mine.txt").write_text("x") else None


def test_incomplete_or_duplicated_tables_are_refused():
    import pyarrow as pa

    base = [{"query_id": "a", "model": "gemma-2-9b-it", "score": 1.0, "cost_usd": 0.1},
            {"query_id": "a", "model": "codegemma-7b", "score": 0.0, "cost_usd": 0.1},
            {"query_id": "b", "model": "gemma-2-9b-it", "score": 1.0, "cost_usd": 0.1}]
    with pytest.raises(InputError, match="no row for model 'codegemma-7b'"):
        QueryDataset.from_long(pa.Table.from_pylist(base))
    with pytest.raises(InputError, match="each \\(query, model\\) pair must appear once"):
        QueryDataset.from_long(pa.Table.from_pylist(base + [base[0]]))
    with pytest.raises(InputError, match="lacks the column"):
        QueryDataset.from_long(pa.Table.from_pylist([{"query_id": "a", "model": "x"}]))
    nan = [dict(r, score=float("nan")) if i == 0 else r for i, r in enumerate(base[:2])]
    with pytest.raises(InputError, match="not finite"):
        QueryDataset.from_long(pa.Table.from_pylist(nan))


def test_budget_pacing_by_hand_and_on_a_shift():
    from routelab.queries.pacing import paced_threshold

    scores = np.array([0.9, 0.8, 0.7, 0.6])
    strong, weak = np.full(4, 0.010), np.full(4, 0.001)
    # budget $5.5/1k = $0.0055 per query; start 0.75, step 0.1:
    # q0 0.9>=0.75 strong, mean 0.010 > 0.0055 -> 0.85; q1 0.8<0.85 weak, mean 0.0055 not above -> 0.75;
    # q2 0.7<0.75 weak, mean 0.004 -> 0.65; q3 0.6<0.65 weak
    run = paced_threshold(scores, strong, weak, 5.5, start_threshold=0.75, step=0.1)
    assert run.strong_Q.tolist() == [True, False, False, False]
    np.testing.assert_allclose(run.threshold_Q, [0.75, 0.85, 0.75, 0.65])
    assert run.spend_per_1k == pytest.approx((0.010 + 3 * 0.001) / 4 * 1000)
    # a stream whose scores drift upward: the fixed threshold overspends, the paced one holds the budget
    drift = np.random.default_rng(0).random(4000) + np.linspace(0, 1, 4000)
    big, small = np.full(4000, 0.01), np.full(4000, 0.0)
    fixed = paced_threshold(drift, big, small, 3.0, start_threshold=float(np.quantile(drift[:400], 0.7)), step=0.0)
    paced = paced_threshold(drift, big, small, 3.0, start_threshold=float(np.quantile(drift[:400], 0.7)), step=0.01)
    assert fixed.spend_per_1k > 6.0
    assert paced.spend_per_1k == pytest.approx(3.0, rel=0.05)


def test_documented_quick_start_runs():
    from routelab.queries.evaluate import evaluate_router, prepare

    gsm = load_dataset("routellm-gsm8k")
    prepared = prepare(gsm, seed=0)
    row, curve = evaluate_router(prepared, "knn")
    assert {"apgr", "cpt50", "cpt80", "aiq", "oracle_gap"} <= set(row) and curve
    router = create_query_router("knn", k=20).fit(prepared.context())
    policy = RoutingPolicy(router, prepared.embedder, gsm.models, ("utility", 0.2), fallback=gsm.models[0])
    decisions = policy.route(["What is 12 times 7?", ""])
    assert decisions[0].model in gsm.models and decisions[1].reason.startswith("fallback")
