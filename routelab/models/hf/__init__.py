"""Routing inside pretrained transformers MoE models (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE,
DeepSeek-V3, GPT-OSS): observe, trace, replace, reroute, steer and fine-tune routers.

``attach(model)`` returns a ``RoutingHandle``; see ``routelab.models.hf.attach``.
transformers is imported only when a model is attached.
"""

from routelab.models.hf.attach import MoELayer, RoutingHandle, attach
from routelab.models.hf.observe import RouterCall
from routelab.models.hf.registry import ARCHITECTURES, Architecture, architecture_of, supported_architectures
from routelab.models.hf.rerouting import RerouteConfig, Rerouter
from routelab.models.hf.roma import (
    RomaTrainer,
    SuccessfulSet,
    manifold_regulariser,
    mean_token_embedding,
    neighbour_weights,
    routing_vectors,
)
from routelab.models.hf.routers import EquivalentPreset, PretrainedInit, equivalent_preset, native_router, preset_router
from routelab.models.hf.recording import HFRoutingSource, TraceObserver, open_writer, record, trace_metadata
from routelab.models.hf.steering import (
    Steering,
    activation_rates,
    domain_experts,
    risk_difference,
    steer,
    top_experts,
    trace_risk_difference,
)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "EquivalentPreset",
    "HFRoutingSource",
    "MoELayer",
    "PretrainedInit",
    "RerouteConfig",
    "Rerouter",
    "RomaTrainer",
    "RouterCall",
    "RoutingHandle",
    "Steering",
    "SuccessfulSet",
    "TraceObserver",
    "activation_rates",
    "architecture_of",
    "attach",
    "domain_experts",
    "equivalent_preset",
    "manifold_regulariser",
    "mean_token_embedding",
    "native_router",
    "neighbour_weights",
    "open_writer",
    "preset_router",
    "record",
    "risk_difference",
    "routing_vectors",
    "steer",
    "supported_architectures",
    "top_experts",
    "trace_metadata",
    "trace_risk_difference",
]
