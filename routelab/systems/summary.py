"""``serving_summary``: the serving numbers of one trace in one dict (for ``routelab compare``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from routelab.metrics.locality import active_experts, segment_cache_hit_rates
from routelab.systems.cache import simulate_cache
from routelab.systems.ep import EPCostModel, LLEPConfig, default_devices, simulate_ep


def serving_summary(
    trace,  # noqa: ANN001 - TraceLike
    *,
    sch_future_len: int = 16,
    sequence_stride: int = 1,
    devices: int | None = None,
    batch_tokens: int = 16384,
    llep: LLEPConfig | None = None,
    ep_model: EPCostModel | None = None,
) -> dict[str, Any]:
    """What a router's routing costs a server, at a cache of twice the active experts.

    Returns:
        ``cache_size``: ``min(2k, E)`` experts per layer (k = mean active experts per token);
        ``sch_2k``: SCH with look-ahead ``sch_future_len`` (moe-lrc rules), mean over layers;
        ``lru_hit_2k``: LRU under the same rules; ``lru_serving_hit_2k``: LRU share of expert
        uses that need no load, one continuous stream per layer; ``ep_devices``;
        ``ep_max_mean`` and ``ep_max_mean_llep``: device max/mean load per step, standard EP
        and LLEP with the defaults λ = 1.3, α = 1, m = 1024; ``llep_speedup``: modelled
        step time, standard / LLEP.
    """
    k = active_experts(trace)
    cache_size = min(2 * k, trace.num_experts)
    curves = segment_cache_hit_rates(trace, future_lens=[sch_future_len], baselines=["lru"],
                                     level="layer", sequence_stride=sequence_stride)
    sch = [c.at(cache_size) for c in curves if c.policy == "sch"]
    lru = [c.at(cache_size) for c in curves if c.policy == "lru"]
    serving = simulate_cache(trace, cache_sizes=[cache_size], policies=["lru"]).get("lru", cache_size)
    devices = devices or default_devices(trace.num_experts)
    ep = simulate_ep(trace, devices=devices, batch_tokens=min(batch_tokens, max(trace.num_tokens, 1)),
                     llep=llep, model=ep_model)
    return {
        "cache_size": cache_size,
        "sch_2k": float(np.mean(sch)),
        "lru_hit_2k": float(np.mean(lru)),
        "lru_serving_hit_2k": serving.hit_rate,
        "ep_devices": devices,
        "ep_max_mean": ep.max_mean_load,
        "ep_max_mean_llep": ep.max_mean_load_llep,
        "llep_speedup": ep.speedup,
    }
