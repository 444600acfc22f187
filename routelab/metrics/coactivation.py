"""Expert co-activation within a layer and expert transitions between consecutive layers.

- ``Co[i, j] = Σ_t A_ti A_tj`` for the ``[T, E]`` activity mask ``A`` (diagonal = load) and
  the conditional ``P(j | i) = Co[i, j] / Co[i, i]`` (standard).
- ``transitions[e, e'] = Σ_t A^{(l)}_{te} A^{(l+1)}_{te'}``: how often a token routed to e at
  layer l goes to e' at layer l+1. Row-normalised, it is the table a layer-ahead prefetcher
  uses to predict layer l+1's experts from layer l's routing (ExpertFlow, arXiv 2410.17954;
  the speculative prefetch of Eliseev & Mazur 2023, "Fast inference of mixture-of-experts
  language models with offloading").
"""

from __future__ import annotations

import numpy as np

from routelab.core.errors import InputError


def _pair_counts(idx_a_TK: np.ndarray, idx_b_TK: np.ndarray, num_experts: int, *, chunk: int = 1 << 16) -> np.ndarray:
    """``Σ_t Σ_{i∈a_t, j∈b_t} [i, j]`` as int64 ``[E, E]`` (token chunks bound memory)."""
    a, b = np.asarray(idx_a_TK), np.asarray(idx_b_TK)
    if a.shape[0] != b.shape[0]:
        raise InputError(f"the two routings cover {a.shape[0]} and {b.shape[0]} tokens.")
    out = np.zeros(num_experts * num_experts, dtype=np.int64)
    for start in range(0, a.shape[0], chunk):
        ca, cb = a[start : start + chunk].astype(np.int64), b[start : start + chunk].astype(np.int64)
        keys = ca[:, :, None] * num_experts + cb[:, None, :]
        valid = (ca[:, :, None] >= 0) & (cb[:, None, :] >= 0)
        out += np.bincount(keys[valid], minlength=num_experts * num_experts)
    return out.reshape(num_experts, num_experts)


def coactivation_matrix(topk_idx_TK: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 ``[E, E]`` co-activation counts of one layer (diagonal = per-expert load)."""
    return _pair_counts(topk_idx_TK, topk_idx_TK, num_experts)


def conditional_coactivation(co_EE: np.ndarray) -> np.ndarray:
    """``P(j | i) = Co[i, j] / Co[i, i]`` (rows of unused experts are 0)."""
    co = np.asarray(co_EE, dtype=np.float64)
    diag = np.diag(co)[:, None]
    return np.divide(co, diag, out=np.zeros_like(co), where=diag > 0)


def layer_transition_counts(idx_l_TK: np.ndarray, idx_next_TK: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 ``[E, E]``: tokens routed to ``e`` at layer l and to ``e'`` at layer l+1."""
    return _pair_counts(idx_l_TK, idx_next_TK, num_experts)
