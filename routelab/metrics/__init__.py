"""Pure functions over routing traces (``routelab.Trace`` or ``routelab.traces.InMemoryTrace``).

Each module names the paper or code its definitions come from: balance (MaxVio, CV,
entropy, Gini), fluctuation (flip rate, Jaccard, StableMoE), locality (SRP, SCH and the
LRU/LFU/Belady baselines of moe-lrc), sparsity (TLS/CLS of BlockFFN), specialization (per-
domain distributions, JSD, mutual information, vocabulary), coactivation. The replay
kernels behind SRP/SCH live in ``routelab.metrics.replay``.
"""

from routelab.metrics.balance import BalanceReport, balance_metrics, gini, layer_balance, load_counts
from routelab.metrics.coactivation import coactivation_matrix, conditional_coactivation, layer_transition_counts
from routelab.metrics.fluctuation import (
    StableMoEFluctuation,
    TraceFluctuation,
    fluctuation_between,
    stablemoe_fluctuation,
    top1_experts,
    topk_flip_rate,
    topk_jaccard,
)
from routelab.metrics.locality import (
    SEG_LENGTHS,
    CacheCurve,
    SRPResult,
    cache_hit_curve,
    segment_cache_hit_rates,
    segment_routing_performance,
    srp_from_histogram,
)
from routelab.metrics.sparsity import chunk_level_sparsity, sparsity_by_layer, token_level_sparsity
from routelab.metrics.specialization import (
    activation_rate_difference,
    domain_distributions,
    domain_divergence,
    expert_domain_specialization,
    jensen_shannon,
    mutual_information,
    vocabulary_specialization,
)

__all__ = [
    "SEG_LENGTHS",
    "BalanceReport",
    "CacheCurve",
    "SRPResult",
    "StableMoEFluctuation",
    "TraceFluctuation",
    "activation_rate_difference",
    "balance_metrics",
    "cache_hit_curve",
    "chunk_level_sparsity",
    "coactivation_matrix",
    "conditional_coactivation",
    "domain_distributions",
    "domain_divergence",
    "expert_domain_specialization",
    "fluctuation_between",
    "gini",
    "jensen_shannon",
    "layer_balance",
    "layer_transition_counts",
    "load_counts",
    "mutual_information",
    "segment_cache_hit_rates",
    "segment_routing_performance",
    "sparsity_by_layer",
    "srp_from_histogram",
    "stablemoe_fluctuation",
    "token_level_sparsity",
    "top1_experts",
    "topk_flip_rate",
    "topk_jaccard",
    "vocabulary_specialization",
]
