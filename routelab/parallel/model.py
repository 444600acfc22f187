"""EP x DP for a whole model: swap every MoE layer for its expert-parallel version, average
the gradients of the replicated parameters with DDP, and scale the expert gradients.

Gradient convention (each rank's loss is the mean over its own tokens, as in DDP): the
gradient of the global loss is the average over the ``W`` ranks of their gradients. DDP
averages the replicated parameters over all ranks. An expert's gradient arrives on its
rank already summed over the ``N`` ranks of its EP group (the all-to-all backward carries
every rank's contribution), so it is summed over the ``W/N`` copies of the expert and
divided by ``W`` (not by ``W/N``: the mistake of pytorch#160285).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from routelab.moe.layer import MoE
from routelab.parallel.groups import ParallelGroups
from routelab.parallel.layer import ExpertParallelMoE
from routelab.systems.ep import LLEPConfig


def parallelize_moe_layers(
    model: nn.Module, groups: ParallelGroups, *, llep: LLEPConfig | None = None, router_inputs: str = "auto"
) -> list[str]:
    """Replace every ``routelab.MoE`` submodule of ``model`` by an ``ExpertParallelMoE`` (in place).

    Returns the names of the replaced modules. Collective: every rank calls it on the same model.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is MoE:
                parallel = ExpertParallelMoE(child, groups.ep_group, llep=llep, router_inputs=router_inputs)
                setattr(module, child_name, parallel)
                replaced.append(f"{name}.{child_name}" if name else child_name)
    return replaced


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the sharded expert parameters (each rank holds different values)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, ExpertParallelMoE):
            names += [f"{name}.experts.{p}" if name else f"experts.{p}" for p, _ in module.experts.named_parameters()]
    return names


def wrap_data_parallel(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    """DDP over all ranks for every parameter except the sharded experts (returns the wrapper)."""
    if groups.world_size == 1:
        return model
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
    return DistributedDataParallel(model, process_group=groups.dense_group, forward_sync_buffers=False,
                                   device_ids=None if groups.device.type == "cpu" else [groups.device])


def sync_expert_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    """Sum expert gradients over the expert's copies and divide by the world size (see module docstring)."""
    params = dict(model.named_parameters())
    for name in expert_parameter_names(model):
        grad = params[name].grad
        if grad is None:
            continue
        if groups.expert_dp_group is not None:
            dist.all_reduce(grad, group=groups.expert_dp_group)
        grad.div_(groups.world_size)


def clip_grad_norm(model: nn.Module, groups: ParallelGroups, max_norm: float) -> float:
    """Clip to the norm of the full (unsharded) gradient, the value one process would compute."""
    expert_names = set(expert_parameter_names(model))
    dense_sq = torch.zeros((), dtype=torch.float64)
    expert_sq = torch.zeros((), dtype=torch.float64)
    grads = []
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        grads.append(param.grad)
        sq = param.grad.detach().double().square().sum().cpu()
        if name in expert_names:
            expert_sq += sq
        else:
            dense_sq += sq
    expert_sq = expert_sq.to(groups.device)
    dist.all_reduce(expert_sq, group=groups.ep_group)  # each expert counted once: its copies are equal
    total = float((dense_sq + expert_sq.cpu()).sqrt())
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for grad in grads:
            grad.mul_(coef)
    return total
