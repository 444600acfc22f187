"""A fixed calibrated threshold vs loss-free-style budget pacing, on a shifting query stream.

A logistic router (Mixtral-8x7B vs GPT-4-1106) is fitted on 75% of the MMLU training split
and its threshold calibrated to a budget in dollars per 1,000 queries on the other 25%
(``calibrate_budget``). It then serves three streams: the MMLU test split shuffled (the
calibration's own distribution), the MMLU test split in subject order (drift), and GSM8K
(another distribution: RouteLLM's thresholds-do-not-transfer complaint). For each, the
fixed threshold and the paced one (``routelab.queries.pacing``) are compared on spend and
quality. Costs follow RouteLLM's nominal 95 + 264 tokens per query.

    python bench/query_pacing.py --budget 3.0 --step 0.01
"""

from __future__ import annotations

import argparse

import numpy as np

from routelab.queries import TfidfSvdEmbedder, calibrate_budget, create_query_router, load_dataset
from routelab.queries.base import FitContext, ScoreScale
from routelab.queries.pacing import paced_threshold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=3.0, help="dollars per 1,000 queries")
    parser.add_argument("--step", type=float, default=0.01, help="pacing step of the threshold")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    mmlu = load_dataset("routellm-mmlu")
    train = mmlu.part("train")
    order = np.random.default_rng(args.seed).permutation(train.num_queries)
    cut = int(0.75 * len(order))
    fit, held_out = train.subset(np.sort(order[:cut])), train.subset(np.sort(order[cut:]))
    embedder = TfidfSvdEmbedder(seed=args.seed).fit(fit)
    scale = ScoreScale.fit(fit.score_QM)
    cost = fit.mean_costs()
    router = create_query_router("logistic", seed=args.seed).fit(
        FitContext(fit, embedder.transform(fit), scale(fit.score_QM), cost / cost.max(), scale, args.seed))
    strong, weak = fit.strong_weak()
    val_scores = router.strong_scores(held_out, embedder.transform(held_out), strong, weak)
    calibration = calibrate_budget(val_scores, held_out.cost_QM[:, strong], held_out.cost_QM[:, weak], args.budget)
    print(f"budget ${args.budget}/1k queries; threshold {calibration.threshold:.4f} calibrated on {held_out.num_queries} "
          f"held-out MMLU training prompts (spend there ${calibration.achieved:.3f}/1k); pacing step {args.step}\n")
    mmlu_test = mmlu.part("test")
    gsm = load_dataset("routellm-gsm8k")
    streams = {
        "MMLU test, shuffled": mmlu_test.subset(np.random.default_rng(args.seed + 1).permutation(mmlu_test.num_queries)),
        "MMLU test, by subject": mmlu_test,
        "GSM8K (all 1,319)": gsm,
    }
    print("| stream | rule | $/1k | spend / budget | quality | strong calls | spend over the last 20% of the stream |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, stream in streams.items():
        s_idx, w_idx = stream.models.index(fit.models[strong]), stream.models.index(fit.models[weak])
        scores = router.strong_scores(stream, embedder.transform(stream), s_idx, w_idx)
        for rule, step in (("fixed threshold", 0.0), ("paced threshold", args.step)):
            run = paced_threshold(scores, stream.cost_QM[:, s_idx], stream.cost_QM[:, w_idx], args.budget,
                                  calibration.threshold, step)
            quality = np.where(run.strong_Q, stream.score_QM[:, s_idx], stream.score_QM[:, w_idx]).mean()
            tail = slice(int(0.8 * stream.num_queries), None)
            tail_spend = np.where(run.strong_Q[tail], stream.cost_QM[tail, s_idx], stream.cost_QM[tail, w_idx]).mean()
            print(f"| {label} | {rule} | {run.spend_per_1k:.3f} | {run.spend_per_1k / args.budget:.2f} | "
                  f"{quality:.4f} | {run.strong_Q.mean():.3f} | {tail_spend * 1000:.3f} |")


if __name__ == "__main__":
    main()
