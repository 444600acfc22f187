"""Expert parallelism over torch.distributed: all-to-all dispatch, Least-Loaded EP, EP x DP training.

See docs/parallel.md. Launch with ``torchrun --nproc-per-node N -m routelab train --expert-parallel N``
or ``routelab launch --nproc N train --expert-parallel N``.
"""

from routelab.parallel.dispatch import DispatchPlan, dispatch_combine_parallel, plan_dispatch
from routelab.parallel.groups import ParallelGroups, build_groups, init_process_group_from_env
from routelab.parallel.layer import ExpertParallelMoE, shard_experts
from routelab.parallel.routing import route_global
from routelab.systems.ep import LLEPConfig

__all__ = [
    "DispatchPlan",
    "ExpertParallelMoE",
    "LLEPConfig",
    "ParallelGroups",
    "build_groups",
    "dispatch_combine_parallel",
    "init_process_group_from_env",
    "plan_dispatch",
    "route_global",
    "shard_experts",
]
