"""The process groups of expert parallelism (EP) x data parallelism (DP).

``W`` ranks form a ``[W/N, N]`` device mesh with dimensions ``("dp", "ep")``: the ``N``
ranks of one ``ep`` row hold one copy of every expert between them (``E/N`` consecutive
experts each, as in Megatron-Core and torchtitan), and the ``W/N`` ranks of one ``dp``
column hold the same experts and average their gradients. Everything that is not an
expert is replicated on all ``W`` ranks and data-parallel over all of them.

Every collective of the MoE layers runs on groups created here, separate from the
default group that data parallelism (DDP) uses, so the two never interleave on one
communicator. Every group carries the same timeout: a rank that dies or stops answering
makes the others fail within it instead of hanging.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from routelab.core.errors import ConfigError

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ParallelGroups:
    """Where this rank sits in the EP x DP layout.

    Attributes:
        rank, world_size: this rank and the number of ranks.
        ep_size, ep_rank: ranks sharing one copy of the experts, and this rank's place among them.
        dp_size: copies of each expert (``world_size // ep_size``).
        mesh: the ``("dp", "ep")`` device mesh.
        ep_group: the group of ``ep`` (all-to-all of tokens, routing gathers).
        expert_dp_group: the group of ``dp`` (expert gradient averaging), None when ``dp_size == 1``.
        dense_group: all ranks, for the data-parallel gradients of the non-expert parameters.
        device: the device of this rank's tensors.
        timeout_s: the collective timeout.
    """

    rank: int
    world_size: int
    ep_size: int
    ep_rank: int
    dp_size: int
    mesh: DeviceMesh
    ep_group: dist.ProcessGroup
    expert_dp_group: dist.ProcessGroup | None
    dense_group: dist.ProcessGroup
    device: torch.device
    timeout_s: float


def default_backend(device: torch.device) -> str:
    """NCCL on CUDA devices, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def check_distributed_launch(expert_parallel: int | None, llep_ratio: float | None = None) -> None:
    """Refuse ``--expert-parallel`` / ``--llep`` early (before any data is prepared) when they cannot run."""
    if expert_parallel is None:
        raise ConfigError("--llep needs --expert-parallel N (LLEP balances experts that are spread over ranks).")
    if expert_parallel < 1:
        raise ConfigError(f"--expert-parallel must be >= 1, got {expert_parallel}.")
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing and not dist.is_initialized():
        raise ConfigError(
            f"--expert-parallel {expert_parallel} needs a distributed launch ({', '.join(missing)} not set); start it "
            f"with `torchrun --nproc-per-node {expert_parallel} -m routelab train ...` or "
            f"`routelab launch --nproc {expert_parallel} train ...`."
        )


def init_process_group_from_env(device: str | torch.device = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the job that ``torchrun`` (or ``routelab launch``) started, unless already joined.

    Reads ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` from the environment.
    """
    if dist.is_initialized():
        return
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ConfigError(
            f"expert parallelism needs a distributed launch, but {', '.join(missing)} is not set; start with "
            "`torchrun --nproc-per-node N -m routelab ...` or `routelab launch --nproc N ...`."
        )
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(default_backend(device), timeout=datetime.timedelta(seconds=timeout_s))


def build_groups(
    ep_size: int, *, device: str | torch.device = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S
) -> ParallelGroups:
    """Build the EP x DP groups on an initialised default process group (collective: every rank calls it)."""
    if not dist.is_initialized():
        raise ConfigError("build_groups needs torch.distributed to be initialised (init_process_group_from_env).")
    world, rank = dist.get_world_size(), dist.get_rank()
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1 or world % ep_size:
        raise ConfigError(
            f"expert_parallel={ep_size!r} must be a positive divisor of the number of processes ({world}); "
            f"use one of {[d for d in range(1, world + 1) if world % d == 0]}."
        )
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dp_size = world // ep_size
    mesh = init_device_mesh(device.type, (dp_size, ep_size), mesh_dim_names=("dp", "ep"))
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = default_backend(device)
    # explicit groups (every rank creates every group, in the same order), each with the timeout
    ep_group = expert_dp_group = None
    for row in range(dp_size):
        group = dist.new_group(list(range(row * ep_size, (row + 1) * ep_size)), timeout=timeout, backend=backend)
        if rank // ep_size == row:
            ep_group = group
    for column in range(ep_size):
        group = dist.new_group(list(range(column, world, ep_size)), timeout=timeout, backend=backend)
        if rank % ep_size == column:
            expert_dp_group = group
    dense_group = dist.new_group(list(range(world)), timeout=timeout, backend=backend)
    assert ep_group is not None and expert_dp_group is not None
    return ParallelGroups(
        rank=rank,
        world_size=world,
        ep_size=ep_size,
        ep_rank=rank % ep_size,
        dp_size=dp_size,
        mesh=mesh,
        ep_group=ep_group,
        expert_dp_group=expert_dp_group if dp_size > 1 else None,
        dense_group=dense_group,
        device=device,
        timeout_s=float(timeout_s),
    )
