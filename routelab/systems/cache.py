"""Expert-offloading simulation: replay a routing trace against an expert cache in device memory.

Experts live in host memory; a cache of ``C`` experts sits on the device. Tokens are decoded
one at a time (token-major, layer by layer), and an expert that is not resident when a
token needs it is loaded (``expert_bytes`` over a link of ``bandwidth`` bytes/s).

- **Demand paging** with LRU (Mixtral-offloading, Eliseev & Mazur 2023), perfect LFU
  (counts survive eviction; LFU beats LRU on real traces per arXiv 2511.05814) and Belady
  (farthest next use: the fewest loads any demand-paging policy can achieve, the upper
  bound). All cache sizes come from one priority-stack pass (``routelab.metrics.replay``).
- **Layer-ahead prefetch** (ExpertFlow, arXiv 2410.17954; the speculative prefetch of
  Mixtral-offloading): while layer l runs, predict layer l+1's experts from layer l's
  routing and load them; a wrong guess is corrected by an on-demand load. The predictor is
  a transition table ``P(e' at l+1 | e at l)`` learned on the first ``train_fraction`` of
  the trace; every policy is then evaluated on the rest. Prefetch loads are reported
  separately with the bytes they move; ``predictor="oracle"`` prefetches the true next
  set (0 correction loads, the upper bound of prediction).
- **Scopes**: ``layer`` = one cache of ``C`` experts per layer; ``pooled`` = one cache of
  ``C·n_layers`` experts shared by all layers (the same memory).

Hit accounting here is physical: a hit is an access that needs no load; every load (cold
ones included) moves ``expert_bytes``. The moe-lrc hit rates (free warm-up, checked before
the token) are in ``routelab.metrics.locality``.

Latency model (per token, summed over layers): compute ``k_active · expert_compute_s``,
demand loads ``loads · expert_bytes / bandwidth`` (synchronous), and prefetch loads that
overlap the previous layer's compute: ``max(0, prefetch_loads · load_time - compute of
layer l-1)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from routelab.core.errors import ConfigError, InputError
from routelab.core.validation import check_choice
from routelab.metrics.coactivation import layer_transition_counts
from routelab.metrics.locality import active_experts
from routelab.metrics.replay import access_trace, lru_prefetch_replay, stack_replay

DEMAND_POLICIES = ("lru", "lfu", "belady")
SCOPES = ("layer", "pooled")
PREDICTORS = ("transition", "oracle")


@dataclass(frozen=True)
class BandwidthModel:
    """Costs of one expert: its size, the host-to-device link and its compute time.

    Defaults: a Mixtral-8x7B expert in bf16 (3 x 4096 x 14336 x 2 bytes = 352 MB), PCIe 4.0
    x16 at 25 GB/s effective, and 0.5 ms of compute per token per expert.
    """

    expert_bytes: float = 3 * 4096 * 14336 * 2
    bandwidth: float = 25e9
    expert_compute_s: float = 5e-4

    def __post_init__(self) -> None:
        for name in ("expert_bytes", "bandwidth"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}.")
        if not self.expert_compute_s >= 0:
            raise ConfigError(f"expert_compute_s must be >= 0, got {self.expert_compute_s}.")

    @property
    def load_s(self) -> float:
        return self.expert_bytes / self.bandwidth


@dataclass(frozen=True)
class CacheResult:
    """One (policy, cache size) point of a sweep.

    ``cache_size`` is in experts per layer (a pooled cache holds ``cache_size·n_layers``).
    ``hit_rate = 1 - demand_loads / accesses``. ``latency_s`` is the modelled time of all
    evaluated tokens; ``latency_per_token_s`` divides it by the tokens.
    """

    policy: str
    scope: str
    cache_size: int
    accesses: int
    demand_loads: int
    prefetch_loads: int
    useful_prefetches: int
    hit_rate: float
    bytes_moved: float
    prefetch_bytes: float
    latency_s: float
    latency_per_token_s: float

    def as_row(self) -> dict[str, float | int | str]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class CacheSweep:
    """Results of ``simulate_cache``, with the predictor's recall/precision when prefetching."""

    results: list[CacheResult]
    tokens: int
    num_layers: int
    model: BandwidthModel
    predictor_recall: float | None = None
    predictor_precision: float | None = None
    notes: list[str] = field(default_factory=list)

    def curve(self, policy: str) -> tuple[np.ndarray, np.ndarray]:
        """``(cache sizes, hit rates)`` of one policy."""
        rows = [r for r in self.results if r.policy == policy]
        if not rows:
            known = sorted({r.policy for r in self.results})
            raise ConfigError(f"policy {policy!r} is not in this sweep; it has {known}.")
        return np.array([r.cache_size for r in rows]), np.array([r.hit_rate for r in rows])

    def get(self, policy: str, cache_size: int) -> CacheResult:
        for r in self.results:
            if r.policy == policy and r.cache_size == cache_size:
                return r
        raise ConfigError(f"no result for policy={policy!r} at cache_size={cache_size}.")


def _check_sizes(cache_sizes: Sequence[int], num_experts: int) -> list[int]:
    sizes = sorted({int(c) for c in cache_sizes})
    if not sizes or sizes[0] < 1:
        raise ConfigError(f"cache_sizes must be positive integers, got {list(cache_sizes)}.")
    if sizes[-1] > num_experts:
        raise ConfigError(f"cache size {sizes[-1]} exceeds num_experts={num_experts} per layer.")
    return sizes


def default_cache_sizes(k: int, num_experts: int) -> list[int]:
    """``k, 2k, 4k, ...`` up to E (E included)."""
    sizes, c = [], max(k, 1)
    while c < num_experts:
        sizes.append(c)
        c *= 2
    return sizes + [num_experts]


def predict_next_layer(
    transition_EE: np.ndarray, idx_TK: np.ndarray, weight_TK: np.ndarray, width: int, *, chunk: int = 1 << 15
) -> np.ndarray:
    """int32 ``[T, width]``: the ``width`` experts of layer l+1 with the highest score
    ``Σ_{e∈S_t} w_te · P(e' | e)`` (row-normalised transitions); -1 where no score."""
    trans = np.asarray(transition_EE, dtype=np.float64)
    rows = trans.sum(axis=1, keepdims=True)
    cond = np.divide(trans, rows, out=np.zeros_like(trans), where=rows > 0)
    num_experts = cond.shape[0]
    width = min(width, num_experts)
    out = np.full((idx_TK.shape[0], width), -1, dtype=np.int32)
    for start in range(0, idx_TK.shape[0], chunk):
        ids = idx_TK[start : start + chunk]
        valid = ids >= 0
        w = np.where(valid, np.asarray(weight_TK[start : start + chunk], dtype=np.float64), 0.0)
        w = np.where(valid & (w.sum(axis=1, keepdims=True) <= 0), 1.0, w)  # unweighted routers
        scores = np.zeros((ids.shape[0], num_experts))
        for j in range(ids.shape[1]):
            scores += w[:, j : j + 1] * cond[np.where(valid[:, j], ids[:, j], 0)] * valid[:, j : j + 1]
        top = np.argsort(-scores, axis=1, kind="stable")[:, :width]
        has = np.take_along_axis(scores, top, axis=1) > 0
        out[start : start + chunk] = np.where(has, top, -1)
    return out


def _recall_precision(pred_TM: np.ndarray, true_TK: np.ndarray) -> tuple[int, int, int]:
    hit = ((pred_TM[:, :, None] == true_TK[:, None, :]) & (pred_TM[:, :, None] >= 0)).any(axis=2).sum()
    return int(hit), int((true_TK >= 0).sum()), int((pred_TM >= 0).sum())


def simulate_cache(
    trace,  # noqa: ANN001 - TraceLike
    *,
    cache_sizes: Sequence[int] | None = None,
    policies: Sequence[str] = DEMAND_POLICIES,
    scope: str = "layer",
    prefetch: bool = False,
    predictor: str = "transition",
    prefetch_width: int | None = None,
    train_fraction: float = 0.5,
    reset_per_sequence: bool = False,
    model: BandwidthModel | None = None,
    workers: int | None = None,
) -> CacheSweep:
    """Replay ``trace`` against expert caches of each size and policy.

    Args:
        cache_sizes: experts per layer (default ``k, 2k, 4k, ..., E`` with ``k`` the mean
            active experts per token).
        policies: demand-paging policies among ``lru``, ``lfu``, ``belady``.
        scope: ``layer`` or ``pooled``.
        prefetch: add the ``prefetch-lru`` policy (LRU plus layer-ahead prefetch).
        predictor: ``transition`` (learned on the first ``train_fraction`` of the tokens;
            all policies are then evaluated on the remaining tokens) or ``oracle``.
        prefetch_width: experts prefetched per token and layer (default: the mean active
            experts per token).
        reset_per_sequence: empty the caches at every sequence (default: one stream).
        model: the bandwidth/compute model.
        workers: threads replaying layers in parallel (default: one per CPU).
    """
    check_choice("scope", scope, SCOPES)
    check_choice("predictor", predictor, PREDICTORS)
    for p in policies:
        check_choice("policy", p, DEMAND_POLICIES)
    model = model or BandwidthModel()
    layers = tuple(trace.layers)
    num_experts, k = trace.num_experts, active_experts(trace)
    sizes = _check_sizes(cache_sizes or default_cache_sizes(k, num_experts), num_experts)
    width = k if prefetch_width is None else int(prefetch_width)
    if prefetch and width < 1:
        raise ConfigError(f"prefetch_width must be >= 1, got {width}.")
    notes: list[str] = []
    routing = {layer: trace.layer(layer) for layer in layers}
    start = 0
    if prefetch and predictor == "transition":
        if not 0 < train_fraction < 1:
            raise ConfigError(f"train_fraction must lie in (0, 1), got {train_fraction}.")
        start = int(round(trace.num_tokens * train_fraction))
        if len(layers) < 2:
            raise ConfigError("layer-ahead prefetch needs at least two layers in the trace.")
        notes.append(
            f"predictor learned on tokens [0, {start}); every policy evaluated on tokens [{start}, {trace.num_tokens})."
        )
    num_tokens = trace.num_tokens - start
    if num_tokens <= 0:
        raise InputError("no tokens left to evaluate; the trace is empty or train_fraction too large.")
    idx = {layer: routing[layer].topk_idx[start:] for layer in layers}
    offsets = np.array([0, num_tokens], dtype=np.int64)
    if reset_per_sequence:
        seq = trace.tokens().seq_id[start:]
        offsets = np.concatenate([[0], np.flatnonzero(np.diff(seq)) + 1, [num_tokens]]).astype(np.int64)
    active = np.stack([(idx[layer] >= 0).sum(axis=1) for layer in layers])  # [L, T]
    compute_s = float(active.sum()) * model.expert_compute_s
    accesses = int(active.sum())
    results: list[CacheResult] = []

    def add(policy: str, c: int, demand_loads: int, prefetch_loads: int = 0, useful: int = 0,
            prefetch_stall_s: float = 0.0) -> None:
        latency = compute_s + demand_loads * model.load_s + prefetch_stall_s
        results.append(CacheResult(
            policy, scope, c, accesses, demand_loads, prefetch_loads, useful,
            1.0 - demand_loads / max(accesses, 1), demand_loads * model.expert_bytes,
            prefetch_loads * model.expert_bytes, latency, latency / num_tokens,
        ))

    pooled_ids = _pooled_stream(idx, layers, num_experts) if scope == "pooled" else None
    pooled_offsets = offsets * len(layers)
    if scope == "layer" and policies:
        def layer_loads(layer: int) -> dict[str, np.ndarray]:
            acc = access_trace(idx[layer], num_experts, offsets)
            return {p: stack_replay(acc, num_experts, p).loads().sum(axis=0) for p in policies}

        with ThreadPoolExecutor(max_workers=max(1, min(workers or os.cpu_count() or 1, len(layers)))) as pool:
            per_layer = list(pool.map(layer_loads, layers))
    for policy in policies:
        if scope == "layer":
            loads = sum(r[policy] for r in per_layer)
            for c in sizes:
                add(policy, c, int(loads[c - 1]))
        else:
            replay = stack_replay(pooled_ids, num_experts * len(layers), policy, seg_offsets=pooled_offsets)
            loads = replay.loads().sum(axis=0)
            for c in sizes:
                add(policy, c, int(loads[c * len(layers) - 1]))

    recall = precision = None
    if prefetch:
        predicted = {layers[0]: np.full((num_tokens, width), -1, np.int32)}
        hits = n_true = n_pred = 0
        for prev, layer in zip(layers[:-1], layers[1:]):
            if predictor == "oracle":
                pred = idx[layer][:, :width] if width <= idx[layer].shape[1] else np.pad(
                    idx[layer], ((0, 0), (0, width - idx[layer].shape[1])), constant_values=-1)
            else:
                trans = layer_transition_counts(
                    routing[prev].topk_idx[:start], routing[layer].topk_idx[:start], num_experts
                )
                pred = predict_next_layer(trans, idx[prev], routing[prev].topk_weight[start:], width)
            predicted[layer] = pred.astype(np.int32)
            h, nt, npred = _recall_precision(predicted[layer], idx[layer])
            hits, n_true, n_pred = hits + h, n_true + nt, n_pred + npred
        recall = hits / max(n_true, 1)
        precision = hits / max(n_pred, 1)
        for c in sizes:
            if scope == "layer":
                demand = prefetch_loads = useful = 0
                step_p = np.zeros((len(layers), num_tokens), np.int64)
                for i, layer in enumerate(layers):
                    r = lru_prefetch_replay(idx[layer], predicted[layer], num_experts, c, seg_offsets=offsets)
                    demand += r.demand_loads
                    prefetch_loads += r.prefetch_loads
                    useful += r.useful_prefetches
                    step_p[i] = r.step_prefetch_loads
            else:
                pred_stream = _pooled_stream(predicted, layers, num_experts)
                r = lru_prefetch_replay(pooled_ids, pred_stream, num_experts * len(layers), c * len(layers),
                                        seg_offsets=pooled_offsets)
                demand, prefetch_loads, useful = r.demand_loads, r.prefetch_loads, r.useful_prefetches
                step_p = r.step_prefetch_loads.reshape(num_tokens, len(layers)).T
            overlap = np.zeros_like(active, dtype=np.float64)
            overlap[1:] = active[:-1] * model.expert_compute_s
            stall = float(np.maximum(step_p * model.load_s - overlap, 0).sum())
            add("prefetch-lru", c, demand, prefetch_loads, useful, stall)
    return CacheSweep(results, num_tokens, len(layers), model, recall, precision, notes)


def _pooled_stream(idx: dict[int, np.ndarray], layers: tuple[int, ...], num_experts: int) -> np.ndarray:
    """``[T·L, K]`` token-major stream of all layers, ids offset by ``position·E``."""
    k = max(a.shape[1] for a in idx.values())
    parts = []
    for i, layer in enumerate(layers):
        a = np.pad(idx[layer], ((0, 0), (0, k - idx[layer].shape[1])), constant_values=-1).astype(np.int32)
        parts.append(np.where(a >= 0, a + i * num_experts, -1))
    stacked = np.stack(parts, axis=1)  # [T, L, K]
    return stacked.reshape(-1, k)
