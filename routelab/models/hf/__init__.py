"""Routing inside pretrained transformers MoE models (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE,
DeepSeek-V3, GPT-OSS): observe, trace, replace, reroute, steer and fine-tune routers.

``attach(model)`` returns a ``RoutingHandle``; see ``routelab.models.hf.attach``.
transformers is imported only when a model is attached.
"""

from routelab.models.hf.attach import MoELayer, RoutingHandle, attach
from routelab.models.hf.observe import RouterCall
from routelab.models.hf.registry import ARCHITECTURES, Architecture, architecture_of, supported_architectures
from routelab.models.hf.routers import EquivalentPreset, PretrainedInit, equivalent_preset, native_router, preset_router

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "EquivalentPreset",
    "MoELayer",
    "PretrainedInit",
    "RouterCall",
    "RoutingHandle",
    "architecture_of",
    "attach",
    "equivalent_preset",
    "native_router",
    "preset_router",
    "supported_architectures",
]
