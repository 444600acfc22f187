"""The expert-parallel MoE layer: ``routelab.MoE`` with its experts spread over a process group."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from routelab.core.context import RoutingContext
from routelab.core.errors import ConfigError
from routelab.moe.experts import BatchedExperts
from routelab.moe.layer import MoE, MoEOutput
from routelab.parallel.dispatch import DispatchPlan, dispatch_combine_parallel, plan_dispatch
from routelab.parallel.routing import (
    ROUTER_INPUTS,
    adopt_global_observations,
    check_router_supported,
    route_global,
)
from routelab.systems.ep import LLEPConfig


def shard_experts(experts: BatchedExperts, ep_rank: int, ep_size: int) -> BatchedExperts:
    """A ``BatchedExperts`` holding experts ``[ep_rank*E/N, (ep_rank+1)*E/N)`` of ``experts`` (copied)."""
    if not isinstance(experts, BatchedExperts):
        raise ConfigError(f"expert parallelism shards routelab BatchedExperts, got {type(experts).__name__}.")
    if experts.num_experts % ep_size:
        raise ConfigError(
            f"num_experts={experts.num_experts} must be a multiple of expert_parallel={ep_size} (each rank holds "
            f"the same number of experts); choose expert_parallel among "
            f"{[d for d in range(1, experts.num_experts + 1) if experts.num_experts % d == 0]}."
        )
    per_rank = experts.num_experts // ep_size
    with torch.random.fork_rng(devices=[]):  # its initial values are overwritten: draw no random numbers
        local = BatchedExperts(per_rank, experts.d_model, experts.d_hidden, experts.activation, experts.implementation)
    rows = slice(ep_rank * per_rank, (ep_rank + 1) * per_rank)
    with torch.no_grad():
        local.w_in_EDH.copy_(experts.w_in_EDH[rows])
        local.w_out_EHD.copy_(experts.w_out_EHD[rows])
    local.to(experts.w_in_EDH.device)
    return local


class ExpertParallelMoE(MoE):
    """``routelab.MoE`` whose routed experts are sharded over the ranks of ``group``.

    Built from a single-process layer (``ExpertParallelMoE(moe, group)``, collective: every
    rank of the group calls it with the same layer). The router, the shared experts and
    their gate are replicated; rank ``j`` keeps experts ``[j*E/N, (j+1)*E/N)`` as its own
    ``experts`` (a ``BatchedExperts`` of ``E/N`` experts, same parameter names as in one
    process). The forward is that of ``MoE`` on this rank's tokens, and equals the
    single-process layer on the concatenation of all ranks' batches (rank order):

    * routing: see ``routelab.parallel.routing`` (scores local, selection, capacity,
      losses and statistics over the global batch);
    * dispatch: see ``routelab.parallel.dispatch`` (all-to-all, grouped GEMM, all-to-all
      back, weighted combine; LLEP when ``llep`` is given).

    ``out.routing`` holds this rank's rows; its ``losses``, ``aux_loss``, ``stats`` and
    ``capacity`` are those of the global batch. ``last_plan`` keeps the last dispatch plan
    (per-rank loads, whether LLEP moved work).

    Args:
        moe: the layer to distribute (router preset, experts, shared experts).
        group: the expert-parallel process group.
        llep: an ``LLEPConfig`` to balance hot experts over ranks, or None for standard EP.
        router_inputs: ``auto`` (default), ``logits`` or ``tokens``: what the ranks gather
            to route the global batch (see ``routelab.parallel.routing``).
    """

    def __init__(
        self, moe: MoE, group: dist.ProcessGroup, *, llep: LLEPConfig | None = None, router_inputs: str = "auto"
    ) -> None:
        nn.Module.__init__(self)
        if type(moe) is not MoE:
            raise ConfigError(f"expert parallelism distributes routelab.MoE layers, got {type(moe).__name__}.")
        if router_inputs not in ROUTER_INPUTS:
            raise ConfigError(f"router_inputs={router_inputs!r} must be one of {ROUTER_INPUTS}.")
        check_router_supported(moe.router)
        self.group = group
        self.ep_size = dist.get_world_size(group)
        adopt_global_observations(moe.router, dist.get_world_size() // self.ep_size)
        self.ep_rank = dist.get_rank(group)
        self.d_model, self.d_hidden, self.num_experts = moe.d_model, moe.d_hidden, moe.num_experts
        self.router = moe.router
        self.top_k = moe.top_k
        self.experts = shard_experts(moe.experts, self.ep_rank, self.ep_size)
        self.num_shared_experts = moe.num_shared_experts
        self.shared_experts = moe.shared_experts
        self.shared_gate = moe.shared_gate
        self.check_inputs = moe.check_inputs
        self.llep = llep
        self.router_inputs = router_inputs
        self.last_plan: DispatchPlan | None = None

    @property
    def local_experts(self) -> range:
        """Global ids of the experts this rank holds."""
        per_rank = self.num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)

    def extra_repr(self) -> str:
        experts = self.local_experts
        return f"experts {experts.start}..{experts.stop - 1} of {self.num_experts} on rank {self.ep_rank}/{self.ep_size}"

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        *,
        timestep: torch.Tensor | None = None,
        attention: torch.Tensor | None = None,
        context: RoutingContext | None = None,
    ) -> MoEOutput:
        x_TD, batch = self.real_tokens(
            x, padding_mask, token_ids, timestep=timestep, attention=attention, context=context
        )
        local, global_routing, counts, inputs = route_global(self.router, x_TD, batch, self.group, self.router_inputs)
        self.router_inputs = inputs  # 'auto' resolves once, the same way on every rank
        plan = plan_dispatch(global_routing.topk_idx, counts, self.ep_rank, self.num_experts, self.llep)
        self.last_plan = plan
        y_TD = dispatch_combine_parallel(x_TD, local.topk_weight, plan, self.experts, self.group)
        y_TD = self.add_shared_experts(x_TD, y_TD)
        return MoEOutput(y=self.padded_output(y_TD, batch), routing=local, aux_loss=local.aux_loss)

