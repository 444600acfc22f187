"""routelab: routing in sparse and modular neural networks.

Every routing method is a router built from parts (scorer -> score function -> selector,
+ balancer, + losses) that returns one ``Routing`` object, run by one fast MoE layer.
"""

from routelab.core import ConfigError, InputError, Routing, RoutelabError, RoutingContext, TokenBatch
from routelab.core.cpu_allocator import tune_cpu_allocator
from routelab.moe import MoE, MoEOutput, SoftMoE, moe_layer
from routelab.routers import Router, create_router, end_of_step, fit_to_data, list_routers, preset_info, register_end_of_step
from routelab.routers.replay import RoutingRecord, record_routing, replay_routing
from routelab.traces import Trace

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "InputError",
    "MoE",
    "MoEOutput",
    "Router",
    "Routing",
    "RoutingRecord",
    "RoutelabError",
    "RoutingContext",
    "SoftMoE",
    "TokenBatch",
    "Trace",
    "create_router",
    "end_of_step",
    "fit_to_data",
    "list_routers",
    "moe_layer",
    "preset_info",
    "record_routing",
    "register_end_of_step",
    "replay_routing",
    "tune_cpu_allocator",
]


def __getattr__(name: str):
    """Lazy submodules: ``routelab.hf`` (transformers integration) loads on first use."""
    if name == "hf":
        import importlib

        return importlib.import_module("routelab.hf")
    raise AttributeError(f"module 'routelab' has no attribute {name!r}")
