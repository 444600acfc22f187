"""Worker functions for the expert-parallel layer tests (run in spawned processes).

Oracle: the single-process ``routelab.MoE`` on the concatenation of every rank's batch,
built from the same seed in each worker. Each rank's loss is its share of the reference
loss (``sum(y * g)`` over its tokens + ``aux_loss / world``), so the sum of the ranks'
gradients is the reference gradient: replicated parameters are summed over ranks, each
expert's gradient lives on its own rank, and input gradients are per token.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import routelab
from routelab.parallel import ExpertParallelMoE, LLEPConfig

D, H, E = 16, 16, 8


def error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest difference, relative to the reference's scale when that exceeds 1 (fp32 sums of
    large values differ in their last bits when summed in another order)."""
    value, reference = value.detach().float(), reference.detach().float()
    if value.numel() == 0:
        return 0.0
    return float((value - reference).abs().max() / max(1.0, float(reference.abs().max())))


def make_batch(world: int, seq_per_rank: int, seq_len: int, padded: bool, skew: float) -> tuple:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(world * seq_per_rank, seq_len, D, generator=gen)
    if skew:
        x = x + skew * torch.ones(D)  # pushes every token towards the same experts
    mask = None
    if padded:
        mask = torch.rand(world * seq_per_rank, seq_len, generator=gen) > 0.3
        mask[:, 0] = True
    g = torch.randn(world * seq_per_rank, seq_len, D, generator=gen)
    return x, mask, g


def compare_layer(rank: int, world: int, cases: list[dict]) -> list[dict]:
    group = dist.new_group(list(range(world)))
    results = []
    for case in cases:
        torch.manual_seed(0)
        reference = routelab.MoE(d_model=D, d_hidden=H, num_experts=E, router=case["router"], **case.get("options", {}))
        if case.get("skew"):
            with torch.no_grad():  # a router that sends most tokens to experts 0 and 1
                weight = next(reference.router.scorer.parameters())
                (weight[:2] if weight.shape[0] == E else weight[:, :2]).add_(case["skew"])
        for module in reference.modules():  # the reference is one process: no reduction over the workers
            if isinstance(getattr(module, "all_reduce", None), bool):
                module.all_reduce = False
        layer = ExpertParallelMoE(copy.deepcopy(reference), group,
                                  llep=LLEPConfig(lam=1.0, min_chunk=1) if case.get("llep") else None)
        optim_ref = torch.optim.SGD(reference.parameters(), lr=0.01)
        optim_ep = torch.optim.SGD(layer.parameters(), lr=0.01)
        worst = {"y": 0.0, "x_grad": 0.0, "param_grad": 0.0, "aux": 0.0, "bias": 0.0, "stats": 0.0}
        rows = slice(rank * case["seq"], (rank + 1) * case["seq"])
        llep_used = False
        for step in range(case.get("steps", 1)):
            x, mask, g = make_batch(world, case["seq"], case["seq_len"], case.get("padded", False), case.get("skew", 0.0))
            x = x + step * 0.01
            x_ref = x.clone().requires_grad_(True)
            rng = torch.get_rng_state()  # both layers draw the same numbers (k-means seeding)
            out_ref = reference(x_ref, padding_mask=mask)
            ((out_ref.y * g).sum() + out_ref.aux_loss).backward()
            x_ep = x[rows].clone().requires_grad_(True)
            torch.set_rng_state(rng)
            out = layer(x_ep, padding_mask=None if mask is None else mask[rows])
            ((out.y * g[rows]).sum() + out.aux_loss / world).backward()
            llep_used |= bool(layer.last_plan.llep_applied)
            worst["y"] = max(worst["y"], error(out.y, out_ref.y[rows]))
            worst["x_grad"] = max(worst["x_grad"], error(x_ep.grad, x_ref.grad[rows]))
            worst["aux"] = max(worst["aux"], error(out.aux_loss, out_ref.aux_loss))
            worst["stats"] = max(worst["stats"], error(out.routing.stats["load"], out_ref.routing.stats["load"]))
            ref_params = dict(reference.named_parameters())
            per_rank = E // world
            for name, param in layer.named_parameters():
                if param.grad is None and ref_params[name].grad is not None:
                    worst["param_grad"] = float("inf")  # one process has a (possibly zero) gradient here
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
                ref_grad = ref_params[name].grad
                ref_grad = torch.zeros_like(ref_params[name]) if ref_grad is None else ref_grad
                if name.startswith("experts."):
                    ref_grad = ref_grad[rank * per_rank : (rank + 1) * per_rank]
                else:
                    grad = grad.clone()
                    dist.all_reduce(grad, group=group)
                worst["param_grad"] = max(worst["param_grad"], error(grad, ref_grad))
            # the data-parallel gradient step: replicated parameters take the summed gradient
            for name, param in layer.named_parameters():
                if not name.startswith("experts.") and param.grad is not None:
                    dist.all_reduce(param.grad, group=group)
            optim_ref.step(), optim_ep.step()
            optim_ref.zero_grad(), optim_ep.zero_grad()
            routelab.end_of_step(reference), routelab.end_of_step(layer)
            for (name, buf), (_, ref_buf) in zip(layer.named_buffers(), reference.named_buffers()):
                if buf.is_floating_point():
                    worst["bias"] = max(worst["bias"], error(buf, ref_buf))
        worst["llep_used"] = llep_used
        worst["rank_rows"] = list(layer.last_plan.device_loads)
        worst["dropped"] = float(out_ref.routing.stats.get("drop_rate", torch.zeros(()))) > 0
        worst["buffers_nonzero"] = any(float(b.abs().sum()) > 0 for b in reference.buffers() if b.is_floating_point())
        results.append(worst)
    return results
