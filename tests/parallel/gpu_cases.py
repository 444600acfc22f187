"""Worker of the NCCL test (spawned; one GPU per rank)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import routelab
from routelab.parallel import ExpertParallelMoE, LLEPConfig


def nccl_layer_matches_single_process(rank: int, world: int) -> dict:
    device = torch.device("cuda", torch.cuda.current_device())
    group = dist.new_group(list(range(world)))
    torch.manual_seed(0)
    reference = routelab.MoE(d_model=64, d_hidden=64, num_experts=8, router="mixtral").to(device)
    layer = ExpertParallelMoE(copy.deepcopy(reference), group, llep=LLEPConfig(lam=1.0, min_chunk=1))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2 * world, 16, 64, generator=gen).to(device)
    rows = slice(2 * rank, 2 * rank + 2)
    x_ref = x.clone().requires_grad_(True)
    out_ref = reference(x_ref)
    (out_ref.y.square().sum() + out_ref.aux_loss).backward()
    x_ep = x[rows].clone().requires_grad_(True)
    out = layer(x_ep)
    (out.y.square().sum() + out.aux_loss / world).backward()
    per_rank = 8 // world
    expert_grad = layer.experts.w_in_EDH.grad
    ref_grad = reference.experts.w_in_EDH.grad[rank * per_rank : (rank + 1) * per_rank]
    scale = max(1.0, float(ref_grad.abs().max()))
    return {
        "y": float((out.y - out_ref.y[rows]).detach().abs().max()),
        "x_grad": float((x_ep.grad - x_ref.grad[rows]).abs().max()),
        "expert_grad": float((expert_grad - ref_grad).abs().max()) / scale,
        "device": torch.cuda.get_device_name(device),
    }
