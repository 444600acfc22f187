"""Routing fluctuation: how much the routing of the same tokens changes between two runs.

- Top-k set flip rate ``1 - |S_a ∩ S_b| / k`` and Jaccard ``|S_a ∩ S_b| / |S_a ∪ S_b|``
  per token, averaged (the pairwise flip rate of Graph-of-Tokens, arXiv 2505.00792, as
  a reconstruction; for k = 1 it is the top-1 flip rate).
  With empty slots ``k = max(|S_a|, |S_b|)``; two empty sets count as unchanged.
- StableMoE's last fluctuation step (Dai et al., "StableMoE: Stable Routing Strategy for
  Mixture of Experts", ACL 2022): over a sequence of checkpoints, the last checkpoint whose
  top-1 expert differs from the final one, and the share of tokens that still fluctuate
  after a given point of training.

Inputs must be the same tokens in the same order (fixed positions in fixed sequences);
``fluctuation_between`` checks that on two traces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from routelab.core.errors import InputError


def _pair(idx_a_TK: np.ndarray, idx_b_TK: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token: |S_a ∩ S_b|, |S_a|, |S_b|."""
    a, b = np.asarray(idx_a_TK), np.asarray(idx_b_TK)
    if a.ndim == 1:
        a = a[:, None]
    if b.ndim == 1:
        b = b[:, None]
    if a.shape[0] != b.shape[0]:
        raise InputError(f"the two routings cover {a.shape[0]} and {b.shape[0]} tokens; they must be the same tokens.")
    common = ((a[:, :, None] == b[:, None, :]) & (a[:, :, None] >= 0)).any(axis=2).sum(axis=1)
    return common, (a >= 0).sum(axis=1), (b >= 0).sum(axis=1)


def topk_flip_rate(idx_a_TK: np.ndarray, idx_b_TK: np.ndarray) -> float:
    """Mean over tokens of ``1 - |S_a ∩ S_b| / max(|S_a|, |S_b|)`` (0 = identical sets)."""
    common, size_a, size_b = _pair(idx_a_TK, idx_b_TK)
    k = np.maximum(size_a, size_b)
    per_token = np.where(k > 0, 1.0 - common / np.maximum(k, 1), 0.0)
    return float(per_token.mean()) if len(per_token) else 0.0


def topk_jaccard(idx_a_TK: np.ndarray, idx_b_TK: np.ndarray) -> float:
    """Mean over tokens of ``|S_a ∩ S_b| / |S_a ∪ S_b|`` (1 = identical sets)."""
    common, size_a, size_b = _pair(idx_a_TK, idx_b_TK)
    union = size_a + size_b - common
    per_token = np.where(union > 0, common / np.maximum(union, 1), 1.0)
    return float(per_token.mean()) if len(per_token) else 1.0


def top1_experts(idx_TK: np.ndarray, weight_TK: np.ndarray | None = None) -> np.ndarray:
    """The target expert of each token: the slot with the largest gate weight (first slot
    on ties, or when no weights are given); ``-1`` for a token with no expert."""
    idx = np.asarray(idx_TK)
    if idx.ndim == 1:
        return idx.copy()
    if weight_TK is None:
        valid = idx >= 0
        first = np.argmax(valid, axis=1)
        out = idx[np.arange(len(idx)), first]
        return np.where(valid.any(axis=1), out, -1)
    weight = np.where(idx >= 0, np.asarray(weight_TK, dtype=np.float64), -np.inf)
    best = np.argmax(weight, axis=1)
    out = idx[np.arange(len(idx)), best]
    return np.where((idx >= 0).any(axis=1), out, -1)


@dataclass(frozen=True)
class StableMoEFluctuation:
    """Last fluctuation step of each token over ``C`` checkpoints.

    Attributes:
        last_step: int ``[T]`` index of the last checkpoint whose top-1 expert differs from
            the final checkpoint's; ``-1`` when the token never differs.
        flip_rates: ``[C-1]`` share of tokens whose top-1 changed between consecutive
            checkpoints.
        progress: ``[C]`` training progress of each checkpoint in [0, 1].
    """

    last_step: np.ndarray
    flip_rates: np.ndarray
    progress: np.ndarray

    def fluctuating_after(self, fraction: float) -> float:
        """Share of tokens whose last fluctuation is at a checkpoint later than ``fraction``
        of training (StableMoE reports 40.9 % after 20 % for BASE Layer)."""
        later = np.where(self.last_step >= 0, self.progress[np.maximum(self.last_step, 0)] > fraction, False)
        return float(later.mean()) if len(later) else 0.0

    def cumulative_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(progress, share of tokens whose last fluctuation is at or before it)``; tokens
        that never fluctuate count as settled from the start."""
        settled = np.array([(self.last_step <= c).mean() if len(self.last_step) else 1.0
                            for c in range(len(self.progress))])
        return self.progress, settled


def stablemoe_fluctuation(top1_QT: np.ndarray, steps: Sequence[float] | None = None) -> StableMoEFluctuation:
    """Last fluctuation steps of ``top1_QT`` (int ``[checkpoints, tokens]`` target experts).

    Args:
        steps: training step of each checkpoint (default ``0 .. C-1``); progress is
            ``step / final step``.
    """
    top1 = np.asarray(top1_QT)
    if top1.ndim != 2 or top1.shape[0] < 1:
        raise InputError(f"top1_QT must have shape [checkpoints, tokens], got {top1.shape}.")
    num_ckpt = top1.shape[0]
    steps_arr = np.arange(num_ckpt, dtype=np.float64) if steps is None else np.asarray(steps, np.float64)
    if steps_arr.shape != (num_ckpt,) or (np.diff(steps_arr) <= 0).any():
        raise InputError(f"steps must be {num_ckpt} increasing values, got {steps_arr.tolist()}.")
    differs = top1 != top1[-1]
    any_diff = differs.any(axis=0)
    last = num_ckpt - 1 - np.argmax(differs[::-1], axis=0)
    last_step = np.where(any_diff, last, -1)
    flips = (top1[1:] != top1[:-1]).mean(axis=1) if top1.shape[1] else np.zeros(num_ckpt - 1)
    final = steps_arr[-1] if steps_arr[-1] > 0 else 1.0
    return StableMoEFluctuation(last_step, flips, steps_arr / final)


@dataclass(frozen=True)
class TraceFluctuation:
    """Per-layer fluctuation between two traces of the same tokens."""

    layers: tuple[int, ...]
    flip_rate: np.ndarray
    jaccard: np.ndarray
    top1_flip_rate: np.ndarray

    def mean(self) -> dict[str, float]:
        return {"flip_rate": float(self.flip_rate.mean()), "jaccard": float(self.jaccard.mean()),
                "top1_flip_rate": float(self.top1_flip_rate.mean())}


def fluctuation_between(trace_a, trace_b) -> TraceFluctuation:  # noqa: ANN001 - TraceLike
    """Flip rate, Jaccard and top-1 flip rate per layer between two traces of the same tokens."""
    tok_a, tok_b = trace_a.tokens(), trace_b.tokens()
    same = (
        len(tok_a) == len(tok_b)
        and np.array_equal(tok_a.seq_id, tok_b.seq_id)
        and np.array_equal(tok_a.position, tok_b.position)
        and np.array_equal(tok_a.token_id, tok_b.token_id)
    )
    if not same:
        raise InputError(
            "the two traces do not hold the same tokens (token_id, seq_id, position must match row by row); "
            "record both over the same corpus with the same settings."
        )
    if tuple(trace_a.layers) != tuple(trace_b.layers):
        raise InputError(f"the traces have different layers: {trace_a.layers} vs {trace_b.layers}.")
    flip, jac, top1 = [], [], []
    for layer in trace_a.layers:
        ra, rb = trace_a.layer(layer), trace_b.layer(layer)
        flip.append(topk_flip_rate(ra.topk_idx, rb.topk_idx))
        jac.append(topk_jaccard(ra.topk_idx, rb.topk_idx))
        t1a, t1b = top1_experts(ra.topk_idx, ra.topk_weight), top1_experts(rb.topk_idx, rb.topk_weight)
        top1.append(float((t1a != t1b).mean()) if len(t1a) else 0.0)
    return TraceFluctuation(tuple(trace_a.layers), np.array(flip), np.array(jac), np.array(top1))
