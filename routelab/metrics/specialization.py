"""Expert specialisation by domain and by token id.

- Per-domain routing distributions: the share of a domain's assignments (or gate mass) that
  goes to each expert, and the Jensen-Shannon divergence between domains. "Multilingual
  routing in MoE" (arXiv 2510.04694) compares such distributions across languages with an
  "entropy-normalised" JSD whose exact normalisation is not published; ``normalize``
  offers ``none`` (nats), ``ln2`` (JSD / ln 2, in [0, 1]) and ``entropy`` (JSD divided by
  the mean entropy of the two distributions) [reconstruction].
- Mutual information between the expert an assignment goes to and the token's domain (or
  token id), in nats, with the normalised variant I / H(domain).
- Expert-domain specialisation ``spec_e = max_d f_{e,d} / Σ_d f_{e,d}`` with ``f_{e,d}`` the
  activation rate of e on domain d; activation-rate difference ``Δ_e = p_e^(1) - p_e^(2)``
  between two corpora (SteerMoE, arXiv 2509.09660).
- Vocabulary specialisation as moe-lrc ``src/20_vocab_calc.py``/``22_vocab_refine.py``: for
  every token type seen at least ``min_count`` times, the expert that receives the largest
  share of its assignments and that share.

Oracles (hand-computed, tested): JSD(one-hot, disjoint one-hot) = ln 2 = 0.6931; JSD([.5,.5],[.9,.1]) = 0.1017.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from routelab.core.errors import ConfigError, InputError
from routelab.core.validation import check_choice

NORMALIZATIONS = ("none", "ln2", "entropy")


def entropy(p: np.ndarray) -> float:
    """Shannon entropy in nats of a distribution (normalised first)."""
    p = np.asarray(p, dtype=np.float64)
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p / total
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def jensen_shannon(p: np.ndarray, q: np.ndarray, *, normalize: str = "none") -> float:
    """Jensen-Shannon divergence ``½KL(p‖m) + ½KL(q‖m)``, ``m = ½(p+q)``, in nats.

    Both inputs are normalised to sum 1. ``normalize``: ``none``, ``ln2`` or ``entropy``
    (divide by the mean of H(p) and H(q); 0 when both are 0).
    """
    check_choice("normalize", normalize, NORMALIZATIONS)
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise InputError(f"p and q must be 1-D of the same length, got {p.shape} and {q.shape}.")
    if (p < 0).any() or (q < 0).any() or p.sum() <= 0 or q.sum() <= 0:
        raise InputError("p and q must be non-negative with a positive sum.")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log(a[nz] / m[nz])).sum())

    jsd = 0.5 * kl(p) + 0.5 * kl(q)
    if normalize == "ln2":
        return jsd / np.log(2)
    if normalize == "entropy":
        mean_h = 0.5 * (entropy(p) + entropy(q))
        return jsd / mean_h if mean_h > 0 else 0.0
    return jsd


def _domain_codes(trace) -> np.ndarray:  # noqa: ANN001
    codes = trace.tokens().domain.astype(np.int64)
    if not trace.domain_names or (codes < 0).all():
        raise InputError("the trace has no domain labels; record it with domains (routelab trace --corpus NAME=PATH).")
    return codes


def domain_distributions(trace, layer: int, *, weighting: str = "count") -> np.ndarray:  # noqa: ANN001
    """``[D, E]``: per domain, the share of its assignments (``count``) or of its gate mass
    (``weight``) that goes to each expert. Rows of domains without tokens are 0."""
    check_choice("weighting", weighting, ("count", "weight"))
    codes = _domain_codes(trace)
    routing = trace.layer(layer)
    idx = routing.topk_idx
    num_domains, num_experts = len(trace.domain_names), trace.num_experts
    valid = (idx >= 0) & (codes[:, None] >= 0)
    mass = np.ones_like(idx, dtype=np.float64) if weighting == "count" else routing.topk_weight.astype(np.float64)
    keys = (np.broadcast_to(codes[:, None], idx.shape) * num_experts + idx)[valid]
    dist = np.bincount(keys, weights=mass[valid], minlength=num_domains * num_experts).reshape(num_domains, num_experts)
    totals = dist.sum(axis=1, keepdims=True)
    return np.divide(dist, totals, out=np.zeros_like(dist), where=totals > 0)


def domain_divergence(
    trace,  # noqa: ANN001 - TraceLike
    layer: int,
    *,
    normalize: str = "none",
    weighting: str = "count",
) -> np.ndarray:
    """``[D, D]`` pairwise JSD between the domains' routing distributions (NaN for a domain
    without tokens)."""
    dist = domain_distributions(trace, layer, weighting=weighting)
    num_domains = len(dist)
    out = np.full((num_domains, num_domains), np.nan)
    for a in range(num_domains):
        for b in range(num_domains):
            if dist[a].sum() > 0 and dist[b].sum() > 0:
                out[a, b] = jensen_shannon(dist[a], dist[b], normalize=normalize)
    return out


def mutual_information(labels_T: np.ndarray, topk_idx_TK: np.ndarray, num_experts: int) -> tuple[float, float]:
    """``(I(expert; label), I / H(label))`` in nats over all assignments.

    Each valid (token, slot) assignment is one sample of (label of the token, expert); tokens
    with a negative label are skipped. Plug-in estimate: biased upwards when labels are many
    and rare (token ids), so compare it against the same estimate on shuffled labels.
    """
    labels = np.asarray(labels_T, dtype=np.int64)
    idx = np.asarray(topk_idx_TK)
    valid = (idx >= 0) & (labels[:, None] >= 0)
    lab = np.broadcast_to(labels[:, None], idx.shape)[valid]
    exp = idx[valid].astype(np.int64)
    if lab.size == 0:
        return 0.0, 0.0
    uniq, lab_code = np.unique(lab, return_inverse=True)
    joint = np.bincount(lab_code * num_experts + exp, minlength=len(uniq) * num_experts).astype(np.float64)
    joint = joint.reshape(len(uniq), num_experts) / lab.size
    p_lab, p_exp = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(p_lab, p_exp)[nz])).sum())
    h_lab = entropy(p_lab)
    return mi, (mi / h_lab if h_lab > 0 else 0.0)


def activation_rates(trace, layer: int) -> np.ndarray:  # noqa: ANN001
    """``[D, E]`` share of each domain's tokens that activate each expert."""
    codes = _domain_codes(trace)
    idx = trace.topk_idx(layer)
    num_domains, num_experts = len(trace.domain_names), trace.num_experts
    valid = (idx >= 0) & (codes[:, None] >= 0)
    keys = (np.broadcast_to(codes[:, None], idx.shape) * num_experts + idx)[valid]
    counts = np.bincount(keys, minlength=num_domains * num_experts).reshape(num_domains, num_experts)
    tokens = np.bincount(codes[codes >= 0], minlength=num_domains)[:, None]
    return np.divide(counts, tokens, out=np.zeros(counts.shape), where=tokens > 0)


def expert_domain_specialization(trace, layer: int) -> np.ndarray:  # noqa: ANN001
    """``[E]`` ``max_d f_{e,d} / Σ_d f_{e,d}`` (1/D = no preference, 1 = one domain only;
    0 for an expert never used)."""
    rates = activation_rates(trace, layer)
    totals = rates.sum(axis=0)
    return np.divide(rates.max(axis=0), totals, out=np.zeros(rates.shape[1]), where=totals > 0)


def activation_rate_difference(trace_a, trace_b, layer: int) -> np.ndarray:  # noqa: ANN001
    """``[E]`` ``Δ_e = p_e^(a) - p_e^(b)``: activation rate (per token) on corpus a minus corpus b."""

    def rate(trace) -> np.ndarray:  # noqa: ANN001
        idx = trace.topk_idx(layer)
        counts = np.bincount(idx[idx >= 0], minlength=trace.num_experts)[: trace.num_experts]
        return counts / max(len(idx), 1)

    return rate(trace_a) - rate(trace_b)


@dataclass(frozen=True)
class VocabularySpecialization:
    """Per token type (seen at least ``min_count`` times): its top expert and that expert's
    share of its assignments (moe-lrc's vocabulary statistics)."""

    token_ids: np.ndarray
    counts: np.ndarray
    top_expert: np.ndarray
    top_share: np.ndarray

    def per_expert(self, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
        """``(token types whose top expert is e, their mean top share)`` per expert."""
        n = np.bincount(self.top_expert, minlength=num_experts)
        total = np.bincount(self.top_expert, weights=self.top_share, minlength=num_experts)
        return n, np.divide(total, n, out=np.zeros(num_experts), where=n > 0)


def vocabulary_specialization(trace, layer: int, *, min_count: int = 20) -> VocabularySpecialization:  # noqa: ANN001
    """Top expert and top share of every token type seen at least ``min_count`` times."""
    if min_count < 1:
        raise ConfigError(f"min_count must be >= 1, got {min_count}.")
    token_ids = trace.tokens().token_id
    if (token_ids < 0).all():
        raise InputError("the trace has no token ids.")
    idx = trace.topk_idx(layer)
    keep_tok = token_ids >= 0
    uniq, code, occurrences = np.unique(token_ids[keep_tok], return_inverse=True, return_counts=True)
    idx = idx[keep_tok]
    valid = idx >= 0
    keys = (np.broadcast_to(code[:, None], idx.shape) * trace.num_experts + idx)[valid]
    counts = np.bincount(keys, minlength=len(uniq) * trace.num_experts).reshape(len(uniq), trace.num_experts)
    frequent = occurrences >= min_count
    counts, uniq, occurrences = counts[frequent], uniq[frequent], occurrences[frequent]
    totals = counts.sum(axis=1)
    top = counts.argmax(axis=1) if len(counts) else np.zeros(0, np.int64)
    share = np.divide(counts.max(axis=1, initial=0), totals, out=np.zeros(len(totals)), where=totals > 0)
    return VocabularySpecialization(uniq, occurrences, top, share)
