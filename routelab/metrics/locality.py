"""Local routing consistency: SRP and SCH, and LRU/LFU/Belady caches on the same traces.

Reproduces the moe-lrc code (Liang et al., "Not all models suit expert offloading: on local
routing consistency of mixture-of-experts models", arXiv 2505.16056; ``ljcleo/moe-lrc``):

- **SRP** (segment routing best performance, ``src/30_srp_calc.py``, ``31_srp_refine.py``).
  For every sliding window of ``W`` tokens inside a sequence and every expert, ``c`` = the
  number of the window's tokens routed to the expert. A threshold ``θ`` predicts the
  expert "needed for the whole window" iff ``c >= θ``: ``matches(θ) = Σ c·[c>=θ]``,
  ``preds(θ) = W·Σ [c>=θ]``, ``acts = Σ c``, ``F1 = 2·matches / max(preds + acts, 1)`` and
  SRP = max over θ. One θ is shared by all experts at the model and layer levels (the
  histograms are summed first); the expert level has a θ per expert. ``act_r = acts /
  preds(0)`` (= k/E for fixed k) and ``best_m = preds / acts`` at the best θ.
- **SCH** (segment cache best hit rate, ``src/41_sch_calc.py``): a cache that keeps the
  experts with the most not-yet-consumed occurrences in the next ``L`` tokens, ties to the
  most recent access; every C = 1..E in one pass. LRU, perfect LFU and Belady
  (``src/50_chr_calc.py``) use the same hit rules: all experts of a token are checked
  before its updates, and a first-ever access while the cache has a free slot is a hit.
  Per-layer curves replay each layer; the model level concatenates all layers' experts
  (ids offset by ``layer·E``) into one trace of ``k·n_layers`` accesses per token with one
  shared cache. Caches restart at every sequence; moe-lrc replays every 16th sequence.
- **Confidence intervals**: basic bootstrap over sequences, ``[2θ̂ - q_hi, 2θ̂ - q_lo]``
  (1000 resamples, 95 %), as moe-lrc.

Note: with k > 1 the moe-lrc hit count is not a count of avoided loads (an expert evicted
by an earlier miss of the same token still counts as a hit); ``routelab.systems.cache``
reports loads and bytes for serving.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from routelab.core.errors import ConfigError, InputError
from routelab.metrics.replay import POLICIES, AccessTrace, access_trace, stack_replay, window_count_histogram

SEG_LENGTHS = (4, 16, 64, 256)
LEVELS = ("model", "layer", "expert")



def map_layers(trace, fn: Callable[[int, np.ndarray], Any], workers: int | None = None) -> list[Any]:  # noqa: ANN001
    """``[fn(layer, topk_idx) for layer in trace.layers]``, computed on ``workers`` threads.

    Layers are read in the calling thread (trace files are not shared between threads); the
    compiled kernels release the GIL, so layers replay in parallel.
    """
    layers = tuple(trace.layers)
    workers = min(workers or os.cpu_count() or 1, len(layers)) if layers else 1
    if workers <= 1:
        return [fn(layer, trace.topk_idx(layer)) for layer in layers]
    results: list[Any] = [None] * len(layers)
    pending: list[tuple[int, Future]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, layer in enumerate(layers):
            if len(pending) >= workers:
                j, future = pending.pop(0)
                results[j] = future.result()
            pending.append((i, pool.submit(fn, layer, trace.topk_idx(layer))))
        for j, future in pending:
            results[j] = future.result()
    return results



def active_experts(trace) -> int:  # noqa: ANN001 - TraceLike
    """Experts per token, rounded (at least 1): the mean number of filled slots over tokens
    and layers. Equals ``k`` for top-k routers; for expert choice, dynamic-k or dropping
    routers it is the average the cache sizes are measured in (moe-lrc's ``cache_m`` unit)."""
    filled = [float((trace.topk_idx(layer) >= 0).sum(axis=1).mean()) for layer in trace.layers if trace.num_tokens]
    return max(int(round(float(np.mean(filled)))) if filled else 1, 1)


# ----------------------------------------------------------------------------- SRP
@dataclass(frozen=True)
class SRPResult:
    """SRP of one window length at one level (``layer`` None = model level; ``expert`` set
    at the expert level). ``f1`` is the F1 for θ = 0..W."""

    window: int
    srp: float
    theta: int
    f1: np.ndarray
    act_r: float
    best_m: float
    layer: int | None = None
    expert: int | None = None
    ci: tuple[float, float] | None = None


def srp_from_histogram(hist: np.ndarray, window: int) -> tuple[float, int, np.ndarray, float, float]:
    """(SRP, best θ, F1 for θ = 0..W, act_r, best_m) from a ``[W+1]`` window-count histogram."""
    hist = np.asarray(hist, dtype=np.float64)
    if hist.shape[-1] != window + 1:
        raise InputError(f"the histogram must have window+1 = {window + 1} bins, got {hist.shape[-1]}.")
    values = np.arange(window + 1, dtype=np.float64)
    matches = np.cumsum((hist * values)[::-1])[::-1]
    preds = np.cumsum(hist[::-1])[::-1] * window
    acts = matches[0]
    f1 = 2 * matches / np.maximum(preds + acts, 1)
    theta = int(np.argmax(f1))
    act_r = float(acts / preds[0]) if preds[0] > 0 else 0.0
    best_m = float(preds[theta] / acts) if acts > 0 else 0.0
    return float(f1[theta]), theta, f1, act_r, best_m


def srp_histograms(
    ids_TK: np.ndarray | AccessTrace,
    num_experts: int,
    window: int,
    seq_offsets: np.ndarray,
    *,
    per_sequence: bool = False,
) -> np.ndarray:
    """Window-count histograms: ``[W+1]`` summed, or ``[S, W+1]`` per sequence."""
    return window_count_histogram(ids_TK, num_experts, window, seg_offsets=seq_offsets, per_segment=per_sequence)


def _bootstrap_weights(num_sequences: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``[B, S]`` multiplicities of each sequence in ``B`` resamples with replacement."""
    draws = rng.integers(0, num_sequences, size=(resamples, num_sequences))
    weights = np.zeros((resamples, num_sequences), np.float64)
    np.add.at(weights, (np.repeat(np.arange(resamples), num_sequences), draws.ravel()), 1.0)
    return weights


def _basic_ci(estimate: float, samples: np.ndarray, confidence: float) -> tuple[float, float]:
    """Basic bootstrap interval ``[2θ̂ - q_hi, 2θ̂ - q_lo]`` with moe-lrc's order statistics."""
    ordered = np.sort(samples)
    lo_i = round(len(ordered) * (1 - confidence) / 2)
    hi_i = min(len(ordered) - lo_i, len(ordered) - 1)
    return float(2 * estimate - ordered[hi_i]), float(2 * estimate - ordered[lo_i])


def _check_windows(windows: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(w) for w in windows)
    if not out or any(w < 1 for w in out):
        raise ConfigError(f"windows must be positive integers, got {list(windows)}.")
    return out


def segment_routing_performance(
    trace,  # noqa: ANN001 - TraceLike
    *,
    windows: Sequence[int] = SEG_LENGTHS,
    level: str = "layer",
    bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
    workers: int | None = None,
) -> list[SRPResult]:
    """SRP of ``trace`` for each window length.

    Args:
        level: ``model`` (one θ over all layers and experts), ``layer`` (one θ per layer) or
            ``expert`` (one θ per layer and expert).
        bootstrap: resamples for the confidence interval (moe-lrc: 1000); 0 = none. Not
            available at the expert level.
        workers: threads replaying layers in parallel (default: one per CPU).

    Returns results ordered by window, then layer (then expert).
    """
    if level not in LEVELS:
        raise ConfigError(f"level={level!r} must be one of {LEVELS}.")
    if bootstrap and level == "expert":
        raise ConfigError("bootstrap intervals are computed at the model and layer levels only.")
    windows = _check_windows(windows)
    offsets = trace.sequence_offsets()
    num_sequences = len(offsets) - 1
    weights = (_bootstrap_weights(num_sequences, bootstrap, np.random.default_rng(seed))
               if bootstrap and num_sequences else None)
    num_experts = trace.num_experts

    def layer_histograms(layer: int, ids: np.ndarray) -> dict[int, np.ndarray]:
        if level == "expert":
            out = {}
            for expert in range(num_experts):
                only = access_trace(np.where((ids == expert).any(axis=1), 0, -1)[:, None], 1, offsets)
                for window in windows:
                    out[(window, expert)] = window_count_histogram(only, 1, window)
            return out
        acc = access_trace(ids, num_experts, offsets)
        if weights is None:
            return {window: window_count_histogram(acc, num_experts, window) for window in windows}
        return {window: srp_histograms(acc, num_experts, window, offsets, per_sequence=True) for window in windows}

    per_layer = dict(zip(trace.layers, map_layers(trace, layer_histograms, workers)))
    results: list[SRPResult] = []
    for window in windows:
        if level == "expert":
            for layer in trace.layers:
                for expert in range(num_experts):
                    srp, theta, f1, act_r, best_m = srp_from_histogram(per_layer[layer][(window, expert)], window)
                    results.append(SRPResult(window, srp, theta, f1, act_r, best_m, layer, expert))
        elif level == "layer":
            results += [
                _srp_result(per_layer[layer][window], window, weights, confidence, layer) for layer in trace.layers
            ]
        else:
            pooled = sum(per_layer[layer][window] for layer in trace.layers)
            results.append(_srp_result(pooled, window, weights, confidence, None))
    return results


def _srp_result(hist: np.ndarray, window: int, weights: np.ndarray | None, confidence: float,
                layer: int | None) -> SRPResult:
    total = hist if weights is None else hist.sum(axis=0)
    srp, theta, f1, act_r, best_m = srp_from_histogram(total, window)
    ci = None
    if weights is not None:
        resampled = weights @ hist.astype(np.float64)  # [B, W+1]
        samples = np.array([srp_from_histogram(h, window)[0] for h in resampled])
        ci = _basic_ci(srp, samples, confidence)
    return SRPResult(window, srp, theta, f1, act_r, best_m, layer, None, ci)


# ----------------------------------------------------------------------------- SCH and caches
@dataclass(frozen=True)
class CacheCurve:
    """Hit rate of a cache of every size ``C = 1..I`` under the moe-lrc rules.

    Attributes:
        policy: ``sch``, ``lru``, ``lfu`` or ``belady``; ``future_len`` is SCH's ``L``.
        layer: the layer, or None for the model-level (pooled) trace.
        hit_rate: ``[I]`` for ``C = 1..I``; ``ci_low``/``ci_high`` bootstrap bounds or None.
        capacity_unit: active experts per token (``k``, or ``k·n_layers`` at the model
            level; the rounded mean for variable-k routers, see ``active_experts``);
            ``cache_multiple = C / capacity_unit`` is moe-lrc's ``cache_m``.
        accesses: accesses replayed.
    """

    policy: str
    future_len: int | None
    layer: int | None
    hit_rate: np.ndarray
    capacity_unit: int
    accesses: int
    ci_low: np.ndarray | None = None
    ci_high: np.ndarray | None = None

    @property
    def cache_sizes(self) -> np.ndarray:
        return np.arange(1, len(self.hit_rate) + 1)

    @property
    def cache_multiple(self) -> np.ndarray:
        return self.cache_sizes / self.capacity_unit

    def at(self, cache_size: int) -> float:
        """Hit rate at ``cache_size`` (clipped to ``1..I``)."""
        return float(self.hit_rate[min(max(int(cache_size), 1), len(self.hit_rate)) - 1])


def cache_hit_curve(
    ids_TK: np.ndarray | AccessTrace,
    num_items: int,
    policy: str,
    seq_offsets: np.ndarray | None = None,
    *,
    future_len: int | None = None,
    capacity_unit: int | None = None,
    layer: int | None = None,
    bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
) -> CacheCurve:
    """Hit-rate curve of ``policy`` on an access trace, caches restarted at every sequence.

    The rate is total hits over total accesses (moe-lrc averages per-sequence rates, which is
    the same when all sequences have equal length).
    """
    result = stack_replay(ids_TK, num_items, policy, seg_offsets=seq_offsets, future_len=future_len or 1)
    hits = result.hits()
    accesses = int(result.accesses.sum())
    rate = hits.sum(axis=0) / max(accesses, 1)
    ci_low = ci_high = None
    if bootstrap and len(result.accesses):
        weights = _bootstrap_weights(len(result.accesses), bootstrap, np.random.default_rng(seed))
        samples = (weights @ hits) / np.maximum(weights @ result.accesses, 1)[:, None]
        bounds = np.array([_basic_ci(rate[c], samples[:, c], confidence) for c in range(num_items)])
        ci_low, ci_high = bounds[:, 0], bounds[:, 1]
    slots = ids_TK.ids.shape[1] if isinstance(ids_TK, AccessTrace) else np.asarray(ids_TK).shape[1]
    unit = capacity_unit or max(int(slots), 1)
    return CacheCurve(policy, future_len if policy == "sch" else None, layer, rate, unit, accesses, ci_low, ci_high)


def model_level_ids(trace, layers: Sequence[int] | None = None) -> np.ndarray:  # noqa: ANN001
    """int32 ``[T, k·n_layers]``: every layer's experts, offset by ``position·E``, per token."""
    layers = tuple(trace.layers) if layers is None else tuple(layers)
    parts = []
    for i, layer in enumerate(layers):
        ids = trace.topk_idx(layer).astype(np.int32)
        parts.append(np.where(ids >= 0, ids + i * trace.num_experts, -1))
    return np.concatenate(parts, axis=1) if parts else np.zeros((trace.num_tokens, 0), np.int32)


def strided_sequences(trace, stride: int):  # noqa: ANN001, ANN201
    """``trace`` restricted to every ``stride``-th sequence (moe-lrc replays ``topk[::16]``)."""
    if stride == 1:
        return trace
    if isinstance(stride, bool) or int(stride) < 1:
        raise ConfigError(f"sequence_stride must be a positive integer, got {stride!r}.")
    offsets = trace.sequence_offsets()
    seq_ids = trace.tokens().seq_id[offsets[:-1]] if len(offsets) > 1 else np.zeros(0, np.int64)
    return trace.select(sequences=seq_ids[:: int(stride)])


def segment_cache_hit_rates(
    trace,  # noqa: ANN001 - TraceLike
    *,
    future_lens: Sequence[int] = SEG_LENGTHS,
    baselines: Sequence[str] = ("lru", "lfu", "belady"),
    level: str = "layer",
    sequence_stride: int = 16,
    bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
    workers: int | None = None,
) -> list[CacheCurve]:
    """SCH curves for each ``L`` in ``future_lens`` and the baseline policies' curves.

    Args:
        level: ``layer`` (one curve per layer) or ``model`` (all layers pooled).
        sequence_stride: replay every ``stride``-th sequence (moe-lrc: 16; 1 = all).
        bootstrap: resamples for confidence intervals (moe-lrc: 1000); 0 = none.
        workers: threads replaying layers in parallel (default: one per CPU).

    Returns curves ordered by layer, then policy (SCH for each ``L`` first).
    """
    if level not in ("layer", "model"):
        raise ConfigError(f"level={level!r} must be 'layer' or 'model'.")
    for name in baselines:
        if name not in POLICIES or name == "sch":
            raise ConfigError(f"baseline {name!r} must be one of lru, lfu, belady.")
    lens = _check_windows(future_lens) if len(future_lens) else ()
    sub = strided_sequences(trace, sequence_stride)
    offsets = sub.sequence_offsets()
    runs = [("sch", L) for L in lens] + [(name, None) for name in baselines]
    common = dict(bootstrap=bootstrap, confidence=confidence, seed=seed)
    if level == "model":
        items = sub.num_experts * len(sub.layers)
        acc = access_trace(model_level_ids(sub), items, offsets)
        unit = active_experts(sub) * len(sub.layers)
        return [cache_hit_curve(acc, items, policy, future_len=L, capacity_unit=unit, **common) for policy, L in runs]

    unit = active_experts(sub)

    def layer_curves(layer: int, ids: np.ndarray) -> list[CacheCurve]:
        acc = access_trace(ids, sub.num_experts, offsets)
        return [cache_hit_curve(acc, sub.num_experts, policy, future_len=L, capacity_unit=unit,
                                layer=layer, **common) for policy, L in runs]

    return [curve for curves in map_layers(sub, layer_curves, workers) for curve in curves]


def mean_curve(curves: Sequence[CacheCurve]) -> np.ndarray:
    """Mean hit-rate curve over layers (curves of one policy and ``L``)."""
    if not curves:
        raise InputError("no curves to average.")
    return np.mean([c.hit_rate for c in curves], axis=0)
