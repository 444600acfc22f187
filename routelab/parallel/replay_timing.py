"""Time standard expert parallelism against LLEP on a recorded routing (real processes).

LLEP (Nguyen et al. 2026, Least-Loaded Expert Parallelism, arXiv 2601.17111) pays off when
the routing leaves some ranks with far more tokens than others. ``llep_step_speedup``
measures that on the routing a trained router actually produced: for every MoE layer of a
recorded ``[L, T, k]`` routing, ``world`` gloo processes run one ``ExpertParallelMoE``
forward + backward on their share of ``T`` tokens routed exactly as recorded, with
standard EP and with LLEP, timed in turn round after round (so that load changes hit both
alike). Each time is the slowest rank's (ranks meet at a barrier first). The result is the
model-level ratio: the sum over layers of the median standard step over the sum of the
median LLEP steps.

The inputs are random activations (the routing is replayed, not recomputed) and each
process uses one thread: the numbers mean "a device per rank" only where every process
has a core of its own.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from routelab.core.errors import InputError
from routelab.systems.ep import LLEPConfig

REPLAY_LOGIT = 30.0  # a recorded expert's logit: far above the others, so top-k picks exactly the recording


class RecordedLogits(nn.Module):
    """A scorer that returns the logits of a recorded routing for this rank's tokens."""

    def __init__(self, logits_TE: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits_TE", logits_TE)

    def forward(self, x_TD: torch.Tensor, draft) -> torch.Tensor:  # noqa: ANN001 - the Scorer signature
        if x_TD.shape[0] != self.logits_TE.shape[0]:
            raise InputError(f"the recorded routing has {self.logits_TE.shape[0]} tokens, the input {x_TD.shape[0]}.")
        return self.logits_TE


def recorded_logits(topk_idx_TK: np.ndarray, num_experts: int) -> torch.Tensor:
    """``[T, E]`` logits whose top-k is ``topk_idx_TK`` (slot order kept by decreasing logits)."""
    num_tokens, k = topk_idx_TK.shape
    logits_TE = torch.zeros(num_tokens, num_experts)
    for slot in range(k):
        column = torch.as_tensor(topk_idx_TK[:, slot], dtype=torch.long)
        valid = column >= 0
        logits_TE[valid.nonzero().squeeze(1), column[valid]] = REPLAY_LOGIT - slot
    return logits_TE


@dataclass(frozen=True)
class ReplayShape:
    """The layer to time: width, expert hidden width, experts and top-k (a run's model config)."""

    d_model: int
    d_hidden: int
    num_experts: int
    top_k: int


def slowest_rank_time(fn, group, *, alone: bool = False) -> float:  # noqa: ANN001
    """The slowest rank's wall time of ``fn()`` after a barrier (``alone``: only rank 0 runs it
    while the others wait, e.g. a single-process reference inside an EP job)."""
    dist.barrier(group=group)
    start = time.perf_counter()
    if not alone or dist.get_rank(group) == 0:
        fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
    return float(elapsed)


def _replay_worker(rank: int, world: int, topk_idx_LTK: np.ndarray, shape: ReplayShape, rounds: int,
                   llep: LLEPConfig) -> dict[str, list[float]]:
    import routelab
    from routelab.parallel.layer import ExpertParallelMoE

    group = dist.new_group(list(range(world)))
    share = topk_idx_LTK.shape[1] // world
    standard_s, llep_s, applied = [], [], []
    for topk_idx_TK in topk_idx_LTK:
        logits_TE = recorded_logits(topk_idx_TK[rank * share : (rank + 1) * share], shape.num_experts)
        layers = {}
        for name, config in (("standard", None), ("llep", llep)):
            torch.manual_seed(0)
            moe = routelab.MoE(d_model=shape.d_model, d_hidden=shape.d_hidden, num_experts=shape.num_experts,
                               top_k=shape.top_k, router="mixtral", aux_loss_coef=0.0)
            moe.router.scorer = RecordedLogits(logits_TE)
            layers[name] = ExpertParallelMoE(moe, group, llep=config)
        x = torch.randn(1, share, shape.d_model, generator=torch.Generator().manual_seed(rank)).requires_grad_()
        times: dict[str, list[float]] = {"standard": [], "llep": []}
        for index in range(rounds + 1):
            for name, layer in layers.items():
                elapsed = slowest_rank_time(lambda layer=layer: layer(x).y.square().mean().backward(), group)
                if index:  # the first round warms up
                    times[name].append(elapsed)
        standard_s.append(statistics.median(times["standard"]))
        llep_s.append(statistics.median(times["llep"]))
        applied.append(float(bool(layers["llep"].last_plan.llep_applied)))
    return {"standard_s": standard_s, "llep_s": llep_s, "llep_applied": applied}


def llep_step_speedup(topk_idx_LTK: np.ndarray, shape: ReplayShape, *, world: int = 2, tokens: int = 4096,
                      rounds: int = 5, llep: LLEPConfig | None = None, timeout_s: float = 600.0) -> dict[str, object]:
    """Measured standard-EP / LLEP time of one forward + backward of every layer of a recorded
    routing (first ``tokens`` tokens), on ``world`` gloo processes of one thread each.

    Returns ``speedup`` (sum of standard medians / sum of LLEP medians), the per-layer
    medians and whether LLEP moved work in each layer (its imbalance gate ``lam``)."""
    from routelab.parallel.spawn import run_workers

    topk_idx_LTK = np.asarray(topk_idx_LTK)
    if topk_idx_LTK.ndim != 3:
        raise InputError(f"topk_idx_LTK must be [layers, tokens, k], got shape {topk_idx_LTK.shape}.")
    usable = min(tokens, topk_idx_LTK.shape[1]) // world * world
    if usable < world:
        raise InputError(f"the routing has {topk_idx_LTK.shape[1]} tokens, fewer than the {world} ranks.")
    llep = llep or LLEPConfig(lam=1.3, alpha=1.0, min_chunk=128)
    result = run_workers(_replay_worker, world, topk_idx_LTK[:, :usable], shape, rounds, llep, timeout_s=timeout_s,
                         collective_timeout_s=timeout_s, threads=1)[0]
    speedup = sum(result["standard_s"]) / sum(result["llep_s"])
    return {"speedup": float(speedup), "world": world, "tokens": usable, "rounds": rounds, **result}


__all__ = ["RecordedLogits", "ReplayShape", "llep_step_speedup", "recorded_logits", "slowest_rank_time"]
