"""Replay of expert-access traces: priority-stack caches, SRP window histograms, LRU prefetch.

An access trace is ``ids_TK`` (int ``[T, K]``, ``-1`` = empty slot): ``T`` steps (tokens of
one layer, or tokens of a pooled model-level trace), each accessing up to ``K`` distinct
items (experts). ``seg_offsets`` (one more entry than segments) splits the steps into
segments (sequences) replayed from an empty cache each.

``stack_replay`` gives, in one pass, the moe-lrc hit counts and the loads of a
demand-paging cache of *every* size for LRU, LFU (perfect), Belady and SCH, using a
priority stack (Mattson et al. 1970: every policy that evicts the lowest of a
size-independent priority order has the inclusion property). The hit rules are those of
moe-lrc (Liang et al., "Local routing consistency", arXiv 2505.16056, code
``src/41_sch_calc.py`` and ``src/50_chr_calc.py``); see ``routelab.metrics.locality``.

The kernels run compiled (``routelab.metrics.native``) with pure-Python fallbacks that give
identical results.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from routelab.core.errors import ConfigError, InputError
from routelab.metrics.native import load_kernels, pointer

POLICIES = ("lru", "lfu", "belady", "sch")


@dataclass(frozen=True)
class StackReplay:
    """Per-segment histograms of a stack replay (``S`` segments, ``I`` items).

    Attributes:
        hit_hist: int64 ``[S, I]``; entry ``c`` counts accesses that are hits for every
            cache size ``> c`` under the moe-lrc rules (checked before the step; a
            first-ever access is a hit while the cache has a free slot).
        keep_hist: int64 ``[S, I]``; entry ``c`` counts accesses whose item was resident,
            at the moment it was used, in every cache of size ``> c`` (no load needed).
        accesses: int64 ``[S]`` valid accesses per segment.
    """

    hit_hist: np.ndarray
    keep_hist: np.ndarray
    accesses: np.ndarray

    def hits(self) -> np.ndarray:
        """int64 ``[S, I]``: hits of a cache of size ``C = 1..I`` (column ``C-1``)."""
        return np.cumsum(self.hit_hist, axis=1)

    def loads(self) -> np.ndarray:
        """int64 ``[S, I]``: item loads (every miss, cold ones included) for ``C = 1..I``."""
        return self.accesses[:, None] - np.cumsum(self.keep_hist, axis=1)


def segment_sums(values_T: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """int64 sums of ``values_T`` over the segments ``[offsets[s], offsets[s+1])``, one per segment."""
    prefix = np.concatenate([[0], np.cumsum(values_T, dtype=np.int64)])
    return prefix[offsets[1:]] - prefix[offsets[:-1]]


@dataclass(frozen=True)
class AccessTrace:
    """A validated access trace: contiguous int32 ``ids`` ``[N, K]``, int64 ``offsets``
    ``[S+1]`` and the number of items. Build it once with ``access_trace`` to replay the
    same trace under several policies without re-checking it."""

    ids: np.ndarray
    offsets: np.ndarray
    num_items: int


def access_trace(ids_TK: np.ndarray, num_items: int, seg_offsets: np.ndarray | None = None) -> AccessTrace:
    """Validate an access trace: ids in ``[-1, num_items)``, no id twice in a step, offsets
    rising from 0 to ``N``."""
    ids = np.asarray(ids_TK)
    if ids.ndim != 2:
        raise InputError(f"ids_TK must have shape [steps, slots], got {ids.shape}.")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"ids_TK must hold integer expert ids, got dtype {ids.dtype}.")
    if num_items < 1 or num_items > np.iinfo(np.int32).max:
        raise ConfigError(f"num_items must be in [1, 2^31), got {num_items}.")
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < -1 or hi >= num_items:
            raise InputError(f"ids_TK holds ids in [{lo}, {hi}]; valid ids are 0..{num_items - 1} and -1 (empty).")
        if ids.shape[1] > 1:
            ordered = np.sort(ids, axis=1)
            dup = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
            if dup.any():
                row = int(np.flatnonzero(dup.any(axis=1))[0])
                raise InputError(
                    f"step {row} accesses the same expert twice ({ids[row].tolist()}); top-k ids must be distinct."
                )
    n = ids.shape[0]
    if seg_offsets is None:
        offsets = np.array([0, n], dtype=np.int64)
    else:
        offsets = np.ascontiguousarray(seg_offsets, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any():
            raise InputError(f"seg_offsets must rise from 0 to the number of steps ({n}); got {offsets[:5]}...")
    return AccessTrace(ids, offsets, int(num_items))


def check_access_trace(
    ids_TK: np.ndarray | AccessTrace, num_items: int, seg_offsets: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, offsets)`` of an ``AccessTrace`` (checked to match) or of raw arrays (validated)."""
    if isinstance(ids_TK, AccessTrace):
        if ids_TK.num_items != num_items:
            raise ConfigError(f"the access trace has {ids_TK.num_items} items but num_items={num_items}.")
        if seg_offsets is not None and not np.array_equal(seg_offsets, ids_TK.offsets):
            raise ConfigError("seg_offsets differ from the offsets the access trace was built with.")
        return ids_TK.ids, ids_TK.offsets
    trace = access_trace(ids_TK, num_items, seg_offsets)
    return trace.ids, trace.offsets


def stack_replay(
    ids_TK: np.ndarray | AccessTrace,
    num_items: int,
    policy: str,
    *,
    seg_offsets: np.ndarray | None = None,
    future_len: int = 1,
    native: bool | None = None,
) -> StackReplay:
    """Replay ``ids_TK`` through caches of every size ``1..num_items`` with ``policy``.

    Args:
        policy: ``lru``, ``lfu`` (perfect LFU: counts survive eviction), ``belady``
            (farthest next use at access granularity; never-used-again items go first,
            the larger id first) or ``sch`` (moe-lrc's future segment frequency).
        future_len: SCH's look-ahead ``L`` in steps (window ``[t, t+L-1]``).
        native: force (True) or forbid (False) the compiled kernel; default: use it when
            it builds.
    """
    if policy not in POLICIES:
        raise ConfigError(f"policy={policy!r} must be one of {POLICIES}.")
    bad_len = isinstance(future_len, bool) or not isinstance(future_len, (int, np.integer)) or future_len < 1
    if policy == "sch" and bad_len:
        raise ConfigError(f"future_len must be an integer >= 1 for SCH, got {future_len!r}.")
    ids, offsets = check_access_trace(ids_TK, num_items, seg_offsets)
    num_segments = len(offsets) - 1
    hit = np.zeros((num_segments, num_items), dtype=np.int64)
    keep = np.zeros((num_segments, num_items), dtype=np.int64)
    lib = _kernels(native)
    code = POLICIES.index(policy)
    if lib is not None:
        status = lib.rl_stack_replay(
            pointer(ids, ctypes.c_int32), ids.shape[0], ids.shape[1], num_items, pointer(offsets, ctypes.c_int64),
            num_segments, code, int(future_len), pointer(hit, ctypes.c_int64), pointer(keep, ctypes.c_int64),
        )
        if status != 0:
            raise MemoryError("the replay kernel could not allocate its work arrays.")
    else:
        _stack_replay_py(ids, num_items, offsets, code, int(future_len), hit, keep)
    return StackReplay(hit, keep, segment_sums((ids >= 0).sum(axis=1), offsets))


def window_count_histogram(
    ids_TK: np.ndarray | AccessTrace,
    num_items: int,
    window: int,
    *,
    seg_offsets: np.ndarray | None = None,
    per_segment: bool = False,
    native: bool | None = None,
) -> np.ndarray:
    """int64 ``[window+1]``: entry ``v`` = number of (window, item) pairs in which the item is
    accessed by exactly ``v`` of the window's steps, over every sliding window of ``window``
    steps (stride 1) inside a segment (moe-lrc ``src/30_srp_calc.py``). ``per_segment``
    gives one histogram per segment, ``[S, window+1]``."""
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ConfigError(f"window must be an integer >= 1, got {window!r}.")
    ids, offsets = check_access_trace(ids_TK, num_items, seg_offsets)
    num_segments = len(offsets) - 1
    hist = np.zeros((num_segments if per_segment else 1, int(window) + 1), dtype=np.int64)
    lib = _kernels(native)
    if lib is not None:
        status = lib.rl_srp_hist(
            pointer(ids, ctypes.c_int32), ids.shape[0], ids.shape[1], num_items, pointer(offsets, ctypes.c_int64),
            num_segments, int(window), int(per_segment), pointer(hist, ctypes.c_int64),
        )
        if status != 0:
            raise MemoryError("the SRP kernel could not allocate its work arrays.")
    else:
        for seg in range(num_segments):
            _window_hist_numpy(ids, num_items, offsets[seg : seg + 2], int(window), hist[seg if per_segment else 0])
    return hist if per_segment else hist[0]


@dataclass(frozen=True)
class PrefetchReplay:
    """Counts of an LRU cache fed with prefetches before each step's demand accesses.

    ``demand_hits`` are accesses resident when the step starts (after its prefetch), with
    no free warm-up: every cold load is a load. ``step_demand_loads``/``step_prefetch_loads``
    are int32 ``[N]``.
    """

    accesses: int
    demand_hits: int
    demand_loads: int
    prefetch_loads: int
    useful_prefetches: int
    step_demand_loads: np.ndarray
    step_prefetch_loads: np.ndarray


def lru_prefetch_replay(
    demand_TK: np.ndarray,
    prefetch_TM: np.ndarray,
    num_items: int,
    cache_size: int,
    *,
    seg_offsets: np.ndarray | None = None,
    native: bool | None = None,
) -> PrefetchReplay:
    """Replay an LRU cache of ``cache_size`` items that loads ``prefetch_TM[t]`` before step ``t``."""
    if isinstance(cache_size, bool) or not isinstance(cache_size, (int, np.integer)) or cache_size < 1:
        raise ConfigError(f"cache_size must be an integer >= 1, got {cache_size!r}.")
    demand, offsets = check_access_trace(demand_TK, num_items, seg_offsets)
    prefetch, _ = check_access_trace(prefetch_TM, num_items, offsets)
    if prefetch.shape[0] != demand.shape[0]:
        raise InputError(f"prefetch_TM has {prefetch.shape[0]} steps but demand_TK has {demand.shape[0]}.")
    totals = np.zeros(5, dtype=np.int64)
    step_d = np.zeros(demand.shape[0], dtype=np.int32)
    step_p = np.zeros(demand.shape[0], dtype=np.int32)
    lib = _kernels(native)
    if lib is not None:
        status = lib.rl_lru_prefetch(
            pointer(demand, ctypes.c_int32), demand.shape[1], pointer(prefetch, ctypes.c_int32), prefetch.shape[1],
            num_items, pointer(offsets, ctypes.c_int64), len(offsets) - 1, int(cache_size),
            pointer(totals, ctypes.c_int64), pointer(step_d, ctypes.c_int32), pointer(step_p, ctypes.c_int32),
        )
        if status != 0:
            raise MemoryError("the prefetch kernel could not allocate its work arrays.")
    else:
        _lru_prefetch_py(demand, prefetch, offsets, int(cache_size), totals, step_d, step_p)
    return PrefetchReplay(*(int(v) for v in totals), step_d, step_p)


def _kernels(native: bool | None):  # noqa: ANN202
    if native is False:
        return None
    lib = load_kernels()
    if native is True and lib is None:
        raise ConfigError("native=True but the C replay kernels could not be built (see the warning above).")
    return lib


# ---------------------------------------------------------------------------------------
# Pure-Python kernels: the same algorithms, used when no C compiler is available.


def _stack_replay_py(ids: np.ndarray, num_items: int, offsets: np.ndarray, policy: int, future_len: int,
                     hit: np.ndarray, keep: np.ndarray) -> None:
    rows = ids.tolist()
    for seg in range(len(offsets) - 1):
        t0, t1 = int(offsets[seg]), int(offsets[seg + 1])
        stack: list[int] = []
        prio: dict[int, tuple[int, int]] = {}
        count = [0] * num_items
        next_use: list[int] = []
        if policy == 2:
            flat = [x for t in range(t0, t1) for x in rows[t] if x >= 0]
            last = {e: len(flat) + 1 + e for e in range(num_items)}
            next_use = [0] * len(flat)
            for a in range(len(flat) - 1, -1, -1):
                next_use[a] = last[flat[a]]
                last[flat[a]] = a + 1
        if policy == 3:
            for t in range(t0, min(t0 + future_len, t1)):
                for x in rows[t]:
                    if x >= 0:
                        count[x] += 1
        uni = ts = 0
        hits, keeps = hit[seg], keep[seg]
        for t in range(t0, t1):
            position = {x: i for i, x in enumerate(stack)}
            for x in rows[t]:
                if x < 0:
                    continue
                if x in position:
                    hits[position[x]] += 1
                else:
                    hits[uni] += 1
                    uni += 1
            for x in rows[t]:
                if x < 0:
                    continue
                pos = stack.index(x) if x in prio else -1
                if pos >= 0:
                    keeps[pos] += 1
                if pos != 0:
                    end = pos if pos >= 0 else len(stack)
                    if pos < 0:
                        stack.append(x)
                    if end > 0:
                        y = stack[0]
                        for i in range(1, end):
                            z = stack[i]
                            if prio[y] > prio[z]:
                                stack[i], y = y, z
                        stack[end] = y
                    stack[0] = x
                ts += 1
                if policy == 0:
                    prio[x] = (ts, 0)
                elif policy == 1:
                    count[x] += 1
                    prio[x] = (count[x], ts)
                elif policy == 2:
                    prio[x] = (-next_use[ts - 1], 0)
                else:
                    count[x] -= 1
                    prio[x] = (count[x], ts)
            if policy == 3 and t + future_len < t1:
                for x in rows[t + future_len]:
                    if x >= 0:
                        count[x] += 1
                        if x in prio:
                            prio[x] = (count[x], prio[x][1])


def _window_hist_numpy(ids: np.ndarray, num_items: int, offsets: np.ndarray, window: int, hist: np.ndarray) -> None:
    """Vectorised SRP histogram (added to ``hist``): window counts from prefix sums of a one-hot map."""
    for seg in range(len(offsets) - 1):
        t0, t1 = int(offsets[seg]), int(offsets[seg + 1])
        if t1 - t0 < window:
            continue
        rows = ids[t0:t1]
        onehot = np.zeros((t1 - t0, num_items + 1), dtype=np.int32)
        token = np.repeat(np.arange(t1 - t0), rows.shape[1])
        np.add.at(onehot, (token, np.where(rows >= 0, rows, num_items).ravel()), 1)
        cumulative = np.cumsum(onehot[:, :num_items], axis=0, dtype=np.int32)
        prefix = np.concatenate([np.zeros((1, num_items), np.int32), cumulative])
        counts = prefix[window:] - prefix[:-window]
        hist += np.bincount(counts.ravel(), minlength=window + 1)[: window + 1]


def _lru_prefetch_py(demand: np.ndarray, prefetch: np.ndarray, offsets: np.ndarray, cache_size: int,
                     totals: np.ndarray, step_d: np.ndarray, step_p: np.ndarray) -> None:
    from collections import OrderedDict

    d_rows, p_rows = demand.tolist(), prefetch.tolist()
    for seg in range(len(offsets) - 1):
        cache: OrderedDict[int, bool] = OrderedDict()  # item -> loaded by prefetch and not used yet

        def insert(x: int, from_prefetch: bool) -> int:
            if x in cache:
                cache.move_to_end(x)
                return 0
            if len(cache) >= cache_size:
                cache.popitem(last=False)
            cache[x] = from_prefetch
            return 1

        for t in range(int(offsets[seg]), int(offsets[seg + 1])):
            loads_p = sum(insert(x, True) for x in p_rows[t] if x >= 0)
            resident = [x in cache for x in d_rows[t]]
            loads_d = 0
            for x, was_resident in zip(d_rows[t], resident):
                if x < 0:
                    continue
                totals[0] += 1
                totals[1] += was_resident
                if cache.get(x):
                    totals[4] += 1
                    cache[x] = False
                loads_d += insert(x, False)
            totals[2] += loads_d
            totals[3] += loads_p
            step_d[t], step_p[t] = loads_d, loads_p
