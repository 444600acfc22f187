"""The MoE layer, batched experts and dispatch."""

from routelab.moe.dispatch import dispatch_combine, sort_by_expert
from routelab.moe.experts import BatchedExperts, DenseFFN
from routelab.moe.layer import MoE, MoEOutput

__all__ = ["BatchedExperts", "DenseFFN", "MoE", "MoEOutput", "dispatch_combine", "sort_by_expert"]
