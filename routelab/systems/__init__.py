"""What routing costs a server, computed from routing traces: expert-offloading caches
(``cache``), ExpertFlow-style batch scheduling (``scheduling``), the expert-parallel load
model with LLEP (``ep``), and ``serving_summary`` for comparison tables."""

from routelab.systems.cache import BandwidthModel, CacheResult, CacheSweep, simulate_cache
from routelab.systems.ep import EPCostModel, EPReport, LLEPConfig, LLEPPlan, llep_plan, simulate_ep
from routelab.systems.scheduling import ScheduleResult, route_sets, schedule_batches, schedule_trace
from routelab.systems.summary import serving_summary

__all__ = [
    "BandwidthModel",
    "CacheResult",
    "CacheSweep",
    "EPCostModel",
    "EPReport",
    "LLEPConfig",
    "LLEPPlan",
    "ScheduleResult",
    "llep_plan",
    "route_sets",
    "schedule_batches",
    "schedule_trace",
    "serving_summary",
    "simulate_cache",
    "simulate_ep",
]
