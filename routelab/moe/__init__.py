"""The MoE layer, batched experts and dispatch."""

from routelab.moe.dispatch import dispatch_combine, sort_by_expert
from routelab.moe.experts import BatchedExperts, DenseFFN
from routelab.moe.hops import HopsOutput, apply_hops
from routelab.moe.layer import MoE, MoEOutput

__all__ = [
    "BatchedExperts",
    "DenseFFN",
    "HopsOutput",
    "MoE",
    "MoEOutput",
    "apply_hops",
    "dispatch_combine",
    "sort_by_expert",
]
