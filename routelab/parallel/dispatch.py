"""Expert-parallel dispatch: who sends which (token, expert) assignment where, and the exchange itself.

Standard EP (LLEP paper Alg. 1; Megatron-Core's all-to-all dispatcher): rank ``j`` of an
``N``-rank group holds experts ``[j*E/N, (j+1)*E/N)``. Each rank sorts its assignments by
destination and expert, sends them with one ``all_to_all_single`` (uneven splits), runs
one grouped GEMM over the rows it received, and sends the results back with the reverse
all-to-all; the source rank does the weighted combine. Every rank holds the routing of the
global batch (see ``routelab.parallel.routing``), so the per-expert counts that an
implementation would otherwise exchange first are known everywhere already.

Least-Loaded EP (LLEP; "Least-loaded expert parallelism", arXiv 2601.17111, code
``SalesforceAIResearch/LeastLoadedEP``): when the most loaded rank exceeds the mean by
``lam``, ``routelab.systems.ep.llep_plan`` (the same plan the cost model uses) moves the
tail of a hot expert's token list to the least-loaded ranks. Those ranks receive the
expert's weights for the step (one more all-to-all, of weights) and, through its
backward, send the weight gradients back to the native rank, where they add up. The
routing and every product are unchanged, so the result equals standard EP up to the
order of floating-point sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from routelab.parallel.collectives import all_to_all
from routelab.systems.ep import LLEPConfig, llep_plan


@dataclass(frozen=True)
class DispatchPlan:
    """This rank's part of one layer's expert-parallel exchange.

    Attributes:
        token_N, flat_N: local token and local ``[T*K]`` slot of every row this rank sends, in send order.
        send_splits, recv_splits: rows sent to / received from each rank of the group.
        recv_perm: orders the received rows by (expert slot, global token).
        slot_counts: rows per expert slot on this rank (local experts, then borrowed ones).
        borrowed: global ids of the experts this rank borrows for the step (sorted).
        lend_local: local index of each expert weight this rank sends, in send order.
        lend_splits, borrow_splits: expert weights sent to / received from each rank.
        device_loads: assignments computed on each rank of the group.
        llep_applied: whether LLEP moved any work.
    """

    token_N: torch.Tensor
    flat_N: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    recv_perm: torch.Tensor
    slot_counts: torch.Tensor
    borrowed: list[int]
    lend_local: list[int]
    lend_splits: list[int]
    borrow_splits: list[int]
    device_loads: list[int]
    llep_applied: bool


def plan_dispatch(
    topk_idx_GK: torch.Tensor,
    counts: list[int],
    rank: int,
    num_experts: int,
    llep: LLEPConfig | None = None,
) -> DispatchPlan:
    """The exchange plan of rank ``rank`` for the global routing ``topk_idx_GK`` (rank ``j`` owns
    ``counts[j]`` of its rows)."""
    size = len(counts)
    per_rank = num_experts // size
    device = topk_idx_GK.device
    k_max = topk_idx_GK.shape[1]
    flat = topk_idx_GK.reshape(-1)
    assignment_A = (flat >= 0).nonzero(as_tuple=True)[0]  # global slot index, in token order
    expert_A = flat.index_select(0, assignment_A)
    token_A = torch.div(assignment_A, k_max, rounding_mode="floor")
    bounds = torch.tensor(np.cumsum(counts), device=device)
    src_A = torch.searchsorted(bounds, token_A, right=True)
    native_A = torch.div(expert_A, per_rank, rounding_mode="floor")
    dest_A = native_A.clone()
    slot_A = expert_A - native_A * per_rank
    borrowed_by: list[list[int]] = [[] for _ in range(size)]
    applied = False
    if llep is not None and size > 1 and assignment_A.numel():
        loads_E = torch.bincount(expert_A, minlength=num_experts).cpu().numpy()
        plan = llep_plan(loads_E, size, llep)
        applied = plan.applied and bool(plan.weight_transfers)
        if applied:
            order_A = torch.argsort(expert_A, stable=True)  # each expert's assignments in global token order
            starts = np.concatenate([[0], np.cumsum(loads_E)])
            dest_sorted = native_A.index_select(0, order_A).clone()
            for expert, pieces in plan.chunks.items():
                for helper, lo, hi in pieces:
                    if hi > lo and helper != expert // per_rank:
                        dest_sorted[starts[expert] + lo : starts[expert] + hi] = helper
            dest_A = torch.empty_like(dest_sorted).index_copy_(0, order_A, dest_sorted)
            for expert, _, helper in sorted(set(plan.weight_transfers)):
                if expert not in borrowed_by[helper]:
                    borrowed_by[helper].append(expert)
            for helper in range(size):
                borrowed_by[helper].sort()
                for position, expert in enumerate(borrowed_by[helper]):
                    moved = (dest_A == helper) & (expert_A == expert)
                    slot_A = torch.where(moved, torch.full_like(slot_A, per_rank + position), slot_A)
    span = int(assignment_A.numel()) + 1
    slots = per_rank + max((len(b) for b in borrowed_by), default=0)
    # send order: by destination, then expert slot, then global token
    mine = src_A == rank
    send_key = (dest_A[mine] * slots + slot_A[mine]) * span + torch.arange(span - 1, device=device)[mine]
    send_order = torch.argsort(send_key)
    local_flat = assignment_A[mine].index_select(0, send_order) - sum(counts[:rank]) * k_max
    send_splits = torch.bincount(dest_A[mine], minlength=size).tolist()
    # arrival order: by source, then slot, then token; compute order: by slot, then token
    incoming = dest_A == rank
    arrival_key = (src_A[incoming] * slots + slot_A[incoming]) * span + torch.arange(span - 1, device=device)[incoming]
    arrival_order = torch.argsort(arrival_key)
    arrival_slot = slot_A[incoming].index_select(0, arrival_order)
    arrival_rank = torch.arange(span - 1, device=device)[incoming].index_select(0, arrival_order)
    recv_perm = torch.argsort(arrival_slot * span + arrival_rank)
    recv_splits = torch.bincount(src_A[incoming], minlength=size).tolist()
    my_slots = per_rank + len(borrowed_by[rank])
    slot_counts = torch.bincount(slot_A[incoming], minlength=my_slots)
    lend_local, lend_splits = [], [0] * size
    for helper in range(size):
        for expert in borrowed_by[helper]:
            if expert // per_rank == rank:
                lend_local.append(expert - rank * per_rank)
                lend_splits[helper] += 1
    borrow_splits = [0] * size
    for expert in borrowed_by[rank]:
        borrow_splits[expert // per_rank] += 1
    return DispatchPlan(
        token_N=torch.div(local_flat, k_max, rounding_mode="floor"),
        flat_N=local_flat,
        send_splits=send_splits,
        recv_splits=recv_splits,
        recv_perm=recv_perm,
        slot_counts=slot_counts,
        borrowed=borrowed_by[rank],
        lend_local=lend_local,
        lend_splits=lend_splits,
        borrow_splits=borrow_splits,
        device_loads=torch.bincount(dest_A, minlength=size).tolist(),
        llep_applied=applied,
    )


def exchange_weights(
    w_in_EDH: torch.Tensor, w_out_EHD: torch.Tensor, plan: DispatchPlan, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's experts followed by the experts it borrows for the step (differentiable:
    the borrowed weights' gradients travel back to their native ranks in the backward)."""
    if not plan.llep_applied:  # the same on every rank: all of them skip the collective, or none
        return w_in_EDH, w_out_EHD
    num_local, d_model, in_width = w_in_EDH.shape
    d_hidden = w_out_EHD.shape[1]
    index = torch.tensor(plan.lend_local, dtype=torch.long, device=w_in_EDH.device)
    packed_LP = torch.cat(
        [w_in_EDH.index_select(0, index).flatten(1), w_out_EHD.index_select(0, index).flatten(1)], dim=1
    )
    received_BP = all_to_all(packed_LP, plan.borrow_splits, plan.lend_splits, group)
    borrowed_in = received_BP[:, : d_model * in_width].reshape(-1, d_model, in_width)
    borrowed_out = received_BP[:, d_model * in_width :].reshape(-1, d_hidden, d_model)
    return torch.cat([w_in_EDH, borrowed_in], 0), torch.cat([w_out_EHD, borrowed_out], 0)


def dispatch_combine_parallel(
    x_TD: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    plan: DispatchPlan,
    experts,  # noqa: ANN001 - BatchedExperts holding this rank's experts
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """``y_t = sum_k w_tk * expert_{idx_tk}(x_t)`` for this rank's tokens, experts spread over ``group``."""
    d_model = x_TD.shape[1]
    x_ND = x_TD.index_select(0, plan.token_N)
    weight_N = topk_weight_TK.reshape(-1).index_select(0, plan.flat_N)
    # N: the (token, expert) rows this rank sends; after the exchange, the rows it received for its own experts
    payload_NF = torch.cat([x_ND, weight_N.to(x_ND.dtype).unsqueeze(1)], dim=1)
    received_NF = all_to_all(payload_NF, plan.recv_splits, plan.send_splits, group)
    ordered_NF = received_NF.index_select(0, plan.recv_perm)
    w_in, w_out = exchange_weights(experts.w_in_EDH, experts.w_out_EHD, plan, group)
    # a copy with dense strides even when no rows arrived (an empty view keeps the payload's
    # row stride, which grouped GEMM rejects); it stays in the graph so that this rank takes
    # part in the backward all-to-all and its experts get (zero) gradients as in one process
    expert_x_ND = ordered_NF[:, :d_model].clone(memory_format=torch.contiguous_format)
    expert_y_ND = experts.forward_sorted(
        expert_x_ND, plan.slot_counts, ordered_NF[:, d_model].contiguous(), w_in_EDH=w_in, w_out_EHD=w_out
    )
    back_ND = torch.empty_like(expert_y_ND).index_copy(0, plan.recv_perm, expert_y_ND) if expert_y_ND.shape[0] else expert_y_ND
    y_ND = all_to_all(back_ND, plan.send_splits, plan.recv_splits, group)
    out_TD = y_ND.new_zeros(x_TD.shape[0], d_model)
    return out_TD.index_add(0, plan.token_N, y_ND)
