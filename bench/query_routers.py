"""Routing throughput and fit time of every query router on the RouteLLM MMLU set.

For each router: fit time on the training split (9,829 prompts) and the time to score the
4,213 test prompts and decide (one utility decision per query), as queries per second, over
the median of ``--repeats`` runs. The reference in the same run is the same router called
one query at a time (as RouteLLM's ``calculate_strong_win_rate(prompt)`` is), on
``--loop-queries`` prompts: the ratio is what batching buys. The embedder (TF-IDF + SVD,
fitted once) is timed separately and excluded from routing time. Bandits route sequentially
by design: their number is one online pass over the test stream (choose + update).

    python bench/query_routers.py                 # all routers
    python bench/query_routers.py --routers knn,mlp,mf --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time


from routelab.core.cpu_allocator import tune_cpu_allocator
from routelab.queries import create_query_router, load_dataset
from routelab.queries.base import utility_choice
from routelab.queries.evaluate import prepare
from routelab.queries.experiment import DEFAULT_ROUTERS


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routers", default=",".join(r for r in DEFAULT_ROUTERS if r != "oracle"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-queries", type=int, default=200)
    args = parser.parse_args()
    if args.repeats < 1 or args.loop_queries < 1:
        parser.error("--repeats and --loop-queries must be >= 1")
    tune_cpu_allocator()
    dataset = load_dataset("routellm-mmlu")
    start = time.perf_counter()
    prepared = prepare(dataset, seed=0)
    print(f"routellm-mmlu: {prepared.train.num_queries} train / {prepared.test.num_queries} test prompts; "
          f"TF-IDF+SVD fit and embed both splits: {time.perf_counter() - start:.1f} s")
    embedder_test = prepared.test
    from routelab.queries.embedders import TfidfSvdEmbedder

    embedder = TfidfSvdEmbedder(seed=0).fit(prepared.train)
    embed_s = timed(lambda: embedder.transform(embedder_test), args.repeats)
    print(f"embedding only (transform of the test prompts): {embedder_test.num_queries / embed_s:,.0f} queries/s\n")
    test, X = prepared.test, prepared.X_test
    n_loop = min(args.loop_queries, test.num_queries)
    print("| router | fit s | batched queries/s | one-at-a-time queries/s | batched / one-at-a-time |")
    print("|---|---:|---:|---:|---:|")
    for name in [r.strip() for r in args.routers.split(",") if r.strip()]:
        router = create_query_router(name, seed=0)
        start = time.perf_counter()
        router.fit(prepared.context())
        fit_s = time.perf_counter() - start
        if router.kind == "score":
            def batched():
                utility_choice(router.predict(test, X), prepared.cost_M, 0.1)

            def one_at_a_time():
                for q in range(n_loop):
                    utility_choice(router.predict(test.subset([q]), X[q:q + 1]), prepared.cost_M, 0.1)

            batch_qps = test.num_queries / timed(batched, args.repeats)
            loop_qps = n_loop / timed(one_at_a_time, max(1, args.repeats // 2))
            print(f"| {name} | {fit_s:.2f} | {batch_qps:,.0f} | {loop_qps:,.0f} | {batch_qps / loop_qps:,.0f} |")
        elif router.kind == "cascade":
            points_s = timed(lambda: router.operating_points(test, X), args.repeats)
            per_point = points_s / (router.thresholds + 1)
            print(f"| {name} | {fit_s:.2f} | {test.num_queries / per_point:,.0f} | - | - |")
        else:
            points = router.operating_points(test, X)
            replay_s = statistics.median(p.extra["test_replay_s"] for p in points)
            print(f"| {name} | {fit_s:.2f} | - | {test.num_queries / replay_s:,.0f} (online choose+update) | - |")


if __name__ == "__main__":
    main()
