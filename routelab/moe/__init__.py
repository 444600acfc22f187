"""The MoE layer, batched experts and dispatch."""

from routelab.moe.dispatch import dispatch_combine, sort_by_expert
from routelab.moe.experts import BatchedExperts, DenseFFN
from routelab.moe.hops import HopsOutput, apply_hops
from routelab.moe.layer import MoE, MoEOutput
from routelab.moe.pool import ExpertPool, build_rexmoe_layers
from routelab.moe.soft import SoftMoE, moe_layer

__all__ = [
    "BatchedExperts",
    "DenseFFN",
    "ExpertPool",
    "HopsOutput",
    "MoE",
    "MoEOutput",
    "SoftMoE",
    "apply_hops",
    "build_rexmoe_layers",
    "dispatch_combine",
    "moe_layer",
    "sort_by_expert",
]
