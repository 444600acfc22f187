"""Slow, obviously-correct cache simulators: one cache size at a time, written from the rules
of moe-lrc's hit accounting (arXiv 2505.16056) and of demand paging, for checking the fast
kernels of routelab.metrics.replay and routelab.systems."""

from __future__ import annotations

import random
from collections.abc import Sequence


def _valid(row: Sequence[int]) -> list[int]:
    return [int(x) for x in row if x >= 0]


def simulate_demand_paging(
    rows: Sequence[Sequence[int]],
    num_items: int,
    cache_size: int,
    policy: str,
    *,
    future_len: int = 1,
    seed: int = 0,
) -> tuple[int, int]:
    """Replay ``rows`` (one list of item ids per step, -1 ignored) through a cache of
    ``cache_size`` items; returns (moe-lrc hits, loads).

    Hits: every access of step t is checked against the cache state before step t; a
    first-ever access counts as a hit while fewer than ``cache_size`` distinct items have
    been seen (the free warm-up of moe-lrc). Loads: every insertion (cold ones included).
    Then each access, in slot order, is inserted if absent, evicting the resident with the
    lowest priority at that moment. Policies: lru, lfu (perfect, counts persist), belady,
    sch (future_len look-ahead), fifo, random (for the optimality property).
    """
    rng = random.Random(seed)
    flat = [(t, x) for t, row in enumerate(rows) for x in _valid(row)]
    cache: set[int] = set()
    seen: set[int] = set()
    last: dict[int, int] = {}
    inserted: dict[int, int] = {}
    count: dict[int, int] = {}
    hits = loads = uni = 0
    access = 0  # index into flat of the access being processed
    for t, row in enumerate(rows):
        valid = _valid(row)
        for x in valid:
            if x in cache:
                hits += 1
            elif x not in seen:
                if uni < cache_size:
                    hits += 1
                uni += 1
                seen.add(x)
        for j, x in enumerate(valid):
            if x not in cache:
                loads += 1
                if len(cache) >= cache_size:
                    def priority(e: int) -> tuple:
                        if policy == "lru":
                            return (last[e],)
                        if policy == "lfu":
                            return (count[e], last[e])
                        if policy == "fifo":
                            return (inserted[e],)
                        if policy == "random":
                            return (rng.random(),)
                        if policy == "belady":
                            nxt = next((b for b in range(access, len(flat)) if flat[b][1] == e), None)
                            return (-(nxt + 1),) if nxt is not None else (-(len(flat) + 1 + e),)
                        if policy == "sch":
                            window = sum(e in _valid(rows[s]) for s in range(t, min(t + future_len, len(rows))))
                            consumed = sum(1 for y in valid[:j] if y == e)
                            return (window - consumed, last[e])
                        raise ValueError(policy)

                    cache.remove(min(cache, key=priority))
                cache.add(x)
                inserted[x] = access
            access += 1
            last[x] = access
            count[x] = count.get(x, 0) + 1
    return hits, loads


def simulate_all_sizes(rows, num_items, policy, *, future_len=1, seed=0):
    """(hits, loads) for every cache size 1..num_items."""
    return [simulate_demand_paging(rows, num_items, c, policy, future_len=future_len, seed=seed)
            for c in range(1, num_items + 1)]


def simulate_lru_prefetch(demand_rows, prefetch_rows, cache_size):
    """LRU cache that inserts the prefetch list before each step's demand accesses.

    Returns (accesses, demand hits, demand loads, prefetch loads, useful prefetches); a
    demand hit is an access resident when the step starts (no free warm-up).
    """
    order: list[int] = []  # least recent first
    fresh: set[int] = set()  # prefetched, not yet used
    accesses = hits = d_loads = p_loads = useful = 0

    def insert(x: int) -> bool:
        if x in order:
            order.remove(x)
            order.append(x)
            return False
        if len(order) >= cache_size:
            victim = order.pop(0)
            fresh.discard(victim)
        order.append(x)
        return True

    for demand, prefetch in zip(demand_rows, prefetch_rows):
        for x in _valid(prefetch):
            if insert(x):
                p_loads += 1
                fresh.add(x)
        resident = [x in order for x in _valid(demand)]
        for x, was in zip(_valid(demand), resident):
            accesses += 1
            hits += was
            if x in fresh and x in order:
                useful += 1
                fresh.discard(x)
            if insert(x):
                d_loads += 1
                fresh.discard(x)
    return accesses, hits, d_loads, p_loads, useful
