"""Expert parallelism over torch.distributed: all-to-all dispatch, Least-Loaded EP, EP x DP training.

See docs/parallel.md. Launch with ``torchrun --nproc-per-node N -m routelab train --expert-parallel N``
or ``routelab launch --nproc N train --expert-parallel N``.
"""

from routelab.parallel.checkpoint import load_checkpoint, save_checkpoint
from routelab.parallel.dispatch import DispatchPlan, dispatch_combine_parallel, plan_dispatch
from routelab.parallel.groups import ParallelGroups, build_groups, init_process_group_from_env
from routelab.parallel.layer import ExpertParallelMoE, shard_experts
from routelab.parallel.model import parallelize_moe_layers
from routelab.parallel.routing import route_global
from routelab.parallel.trainer import ExpertParallelStep
from routelab.parallel.watchdog import RankFailure
from routelab.systems.ep import LLEPConfig

__all__ = [
    "DispatchPlan",
    "ExpertParallelMoE",
    "ExpertParallelStep",
    "LLEPConfig",
    "ParallelGroups",
    "RankFailure",
    "build_groups",
    "dispatch_combine_parallel",
    "init_process_group_from_env",
    "load_checkpoint",
    "parallelize_moe_layers",
    "plan_dispatch",
    "route_global",
    "save_checkpoint",
    "shard_experts",
]
