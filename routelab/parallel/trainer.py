"""One EP x DP optimizer step of a model, the same update one process makes on the global batch.

Each rank takes its contiguous share of every global batch (rows ``[r*B/W, (r+1)*B/W)``),
so the ranks' batches concatenated in rank order are the single-process batch, which is
what the MoE layers route over. The step is: forward and backward on the share (the
loss is the mean over the rank's tokens plus the global-batch router losses), DDP
averages the replicated gradients, ``sync_expert_gradients`` the expert ones, clipping
uses the norm of the full gradient, then AdamW, the LR schedule and
``routelab.end_of_step`` (balancers see the global batch, so they stay identical on all
ranks).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from routelab.core.errors import ConfigError
from routelab.parallel.groups import ParallelGroups
from routelab.parallel.model import clip_grad_norm, sync_expert_gradients, wrap_data_parallel
from routelab.routers import end_of_step


def check_same_config(config: dict[str, Any], groups: ParallelGroups) -> None:
    """Refuse to start when the ranks were given different settings (names the ranks that differ)."""
    text = json.dumps(config, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()
    digests: list[Any] = [None] * groups.world_size
    dist.all_gather_object(digests, digest, group=groups.dense_group)
    differing = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if differing:
        configs: list[Any] = [None] * groups.world_size
        dist.all_gather_object(configs, config, group=groups.dense_group)
        first, other = configs[0], configs[differing[0]]
        keys = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        raise ConfigError(
            f"ranks {differing} were started with settings that differ from rank 0's (keys {keys}); every rank "
            "must run the same command."
        )


def rank_rows(batch_size: int, groups: ParallelGroups) -> slice:
    """This rank's rows of a global batch of ``batch_size`` sequences."""
    if batch_size % groups.world_size:
        raise ConfigError(
            f"batch_size={batch_size} must be a multiple of the number of processes ({groups.world_size}) so that "
            "every rank takes an equal share of each batch."
        )
    share = batch_size // groups.world_size
    return slice(groups.rank * share, (groups.rank + 1) * share)


class ExpertParallelStep:
    """Runs optimizer steps of ``model`` (its MoE layers already made expert-parallel)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, groups: ParallelGroups, *,
                 grad_clip: float = 0.0, scheduler: Any = None) -> None:
        self.model = model
        self.wrapped = wrap_data_parallel(model, groups)
        self.optimizer = optimizer
        self.groups = groups
        self.grad_clip = grad_clip
        self.scheduler = scheduler

    def __call__(
        self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], autocast: Any = None
    ) -> dict[str, float]:
        """One optimizer step over global micro-batches ``(inputs, targets)``; returns the mean
        loss, LM loss and aux loss over the global batch and the gradient norm."""
        totals = torch.zeros(3, dtype=torch.float64)
        for inputs, targets in micro_batches:
            rows = rank_rows(inputs.shape[0], self.groups)
            context = autocast if autocast is not None else _null()
            with context:
                out = self.wrapped(inputs[rows].to(self.groups.device), targets[rows].to(self.groups.device))
            if not torch.isfinite(out.loss):
                raise FloatingPointError(f"the training loss became {float(out.loss)} on rank {self.groups.rank}.")
            (out.loss / len(micro_batches)).backward()
            values = [float(out.loss.detach()), float(out.lm_loss.detach()), float(out.aux_loss.detach())]
            totals += torch.tensor(values, dtype=torch.float64)
        sync_expert_gradients(self.model, self.groups)
        grad_norm = clip_grad_norm(self.model, self.groups, self.grad_clip if self.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        end_of_step(self.model)
        dist.all_reduce(totals, group=self.groups.dense_group)
        totals /= self.groups.world_size * len(micro_batches)
        loss, lm_loss, aux_loss = totals.tolist()
        return {"loss": loss, "lm_loss": lm_loss, "aux_loss": aux_loss, "grad_norm": grad_norm}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
