"""Turn a dead or hung rank into a clear error instead of a hang.

Every collective of an expert-parallel job runs under the groups' timeout (see
``routelab.parallel.groups``): when a rank dies, its peers' next collective fails at once
(the connection closes); when it hangs, they fail after the timeout. ``collective_guard``
wraps one training step: each rank first records the step it reached in the job's
key-value store; when the step fails, the error names the ranks that did not reach it.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist
from torch.distributed import distributed_c10d

from routelab.core.errors import RoutelabError
from routelab.parallel.groups import ParallelGroups

_KEY = "routelab/step/{rank}"


class RankFailure(RoutelabError):
    """A rank of an expert-parallel job died or stopped answering."""


def _store() -> dist.Store | None:
    try:
        return distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None


def _reached(store: dist.Store, world_size: int) -> dict[int, int | None]:
    store.set_timeout(datetime.timedelta(seconds=2))
    steps: dict[int, int | None] = {}
    for rank in range(world_size):
        key = _KEY.format(rank=rank)
        steps[rank] = int(store.get(key)) if store.check([key]) else None
    return steps


@contextmanager
def collective_guard(groups: ParallelGroups, step: int) -> Iterator[None]:
    """Run one step; if a collective in it fails, raise ``RankFailure`` naming the ranks behind."""
    store = _store()
    if store is not None:
        store.set(_KEY.format(rank=groups.rank), str(step))
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as error:
        behind: list[int] = []
        detail = ""
        if store is not None:
            try:
                reached = _reached(store, groups.world_size)
                behind = [r for r, s in reached.items() if r != groups.rank and (s is None or s < step)]
                detail = ", ".join(f"rank {r} at step {reached[r]}" for r in behind)
            except (RuntimeError, dist.DistStoreError):
                behind, detail = [0], "rank 0 hosts the job's store and no longer answers"
        who = f"rank(s) {behind} ({detail})" if behind else "another rank"
        raise RankFailure(
            f"rank {groups.rank}: step {step} failed because {who} died or stopped answering within the "
            f"{groups.timeout_s:.0f} s collective timeout. Original error: {str(error).splitlines()[0][:300]}"
        ) from error
