"""Checkpoints of expert-parallel models with torch.distributed.checkpoint (DCP).

The sharded expert weights (and their AdamW moments) are saved as DTensors placed
``[Replicate() over dp, Shard(0) over ep]`` on the EP x DP mesh, under the parameter names
of the single-process model; everything else is replicated. A checkpoint therefore holds
the same logical tensors whatever wrote it: saved under EP it loads into one process, a
single-process checkpoint loads under EP, and EP=2 loads under EP=4 (DCP reshards).
Per-rank random states sit next to it (``rng-rank{r}.pt``) for exact resume.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, Replicate, Shard

from routelab.core.errors import ConfigError
from routelab.parallel.groups import ParallelGroups
from routelab.parallel.model import expert_parameter_names

FLAT = StateDictOptions(flatten_optimizer_state_dict=True)  # optimizer state keyed "state.<param fqn>.<field>"


def _shard(tensor: torch.Tensor, groups: ParallelGroups) -> DTensor:
    return DTensor.from_local(tensor, groups.mesh, [Replicate(), Shard(0)], run_check=False)


def _local(value: Any) -> Any:
    return value.to_local() if isinstance(value, DTensor) else value


def checkpoint_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, groups: ParallelGroups | None
) -> dict[str, Any]:
    """The DCP state of ``model`` (and ``optimizer``): experts as sharded DTensors under EP."""
    experts = set(expert_parameter_names(model)) if groups is not None else set()
    model_state = dict(model.state_dict())
    for name in experts:
        model_state[name] = _shard(model_state[name], groups)
    state: dict[str, Any] = {"model": model_state}
    if optimizer is not None:
        optim_state = get_optimizer_state_dict(model, optimizer, options=FLAT)
        for key in list(optim_state):
            value = optim_state[key]
            parts = key.split(".")  # "state.<fqn>.<field>"
            is_expert = key.startswith("state.") and ".".join(parts[1:-1]) in experts
            if is_expert and torch.is_tensor(value) and value.dim() > 0:
                optim_state[key] = _shard(value, groups)
        state["optim"] = optim_state
    return state


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    groups: ParallelGroups | None = None, extra: dict[str, Any] | None = None) -> None:
    """Write a DCP checkpoint folder at ``path`` (collective under EP), atomically replacing any old one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    is_writer = groups is None or groups.rank == 0
    if is_writer and tmp.exists():
        shutil.rmtree(tmp)
    if groups is not None:
        dist.barrier(group=groups.dense_group)
    state = checkpoint_state(model, optimizer, groups)
    state["extra_json"] = json.dumps(extra or {})
    dcp.save(state, checkpoint_id=str(tmp), no_dist=groups is None,
             process_group=None if groups is None else groups.dense_group)
    rank = 0 if groups is None else groups.rank
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if groups is not None:
        dist.barrier(group=groups.dense_group)
    if is_writer:
        if path.exists():
            shutil.rmtree(path)
        tmp.replace(path)
    if groups is not None:
        dist.barrier(group=groups.dense_group)


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    groups: ParallelGroups | None = None, *, restore_rng: bool = False) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` under any EP size (or one process); returns its ``extra``."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise ConfigError(
            f"{str(path)!r} is not a routelab DCP checkpoint folder (no .metadata); give the folder save_checkpoint wrote."
        )
    state = checkpoint_state(model, optimizer, groups)
    state["extra_json"] = ""
    dcp.load(state, checkpoint_id=str(path), no_dist=groups is None,
             process_group=None if groups is None else groups.dense_group)
    model.load_state_dict({k: _local(v) for k, v in state["model"].items()})
    if optimizer is not None:
        optim_state = {k: _local(v) for k, v in state["optim"].items()}
        set_optimizer_state_dict(model, optimizer, optim_state, options=FLAT)
    if restore_rng:
        rank = 0 if groups is None else groups.rank
        rng_file = path / f"rng-rank{rank}.pt"
        if not rng_file.is_file():
            raise ConfigError(f"{str(path)!r} holds no random state for rank {rank}: it was written by fewer ranks; "
                              "resume with the same number of processes.")
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads(state["extra_json"])



def rng_state() -> dict[str, Any]:
    """This process's torch, numpy and python random states."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
