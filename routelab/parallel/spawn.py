"""Run a function on ``N`` local processes joined in one gloo/NCCL job (tests, benchmarks).

``run_workers(fn, N, *args)`` starts ``N`` processes with ``torch.multiprocessing``, gives
each a process group on a free local port, calls ``fn(rank, world_size, *args)`` and
returns every rank's return value. A worker that raises makes the call raise with its rank
and traceback; a worker that does not finish within ``timeout_s`` is killed and the call
raises a ``TimeoutError`` naming the ranks that were still running: never a silent hang.
(Users launch jobs with ``torchrun`` or ``routelab launch``; this is the in-process harness.)
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, fn: Callable[..., Any], world_size: int, port: int, folder: str, collective_timeout_s: float,
            threads: int, backend: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(threads)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    out = Path(folder) / f"rank{rank}.pkl"
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout_s))
        result = ("ok", fn(rank, world_size, *args), time.time())
    except BaseException as error:  # noqa: BLE001 - reported to the parent with the traceback
        result = ("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}", time.time())
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(result))
    tmp.replace(out)
    if dist.is_initialized():
        dist.destroy_process_group()


class WorkerError(RuntimeError):
    """A spawned worker raised."""


def run_workers(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    collective_timeout_s: float = 60.0,
    threads: int = 1,
    start_method: str | None = None,
    backend: str = "gloo",
) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each in its own process of one job.

    ``backend`` ``gloo`` (CPU; processes are forked) or ``nccl`` (one GPU per rank; spawned).
    """
    start_method = start_method or ("spawn" if backend == "nccl" else "fork")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="routelab-workers-") as folder:
        context = mp.start_processes(
            _worker, args=(fn, world_size, port, folder, collective_timeout_s, threads, backend, args),
            nprocs=world_size, join=False, start_method=start_method,
        )
        deadline = time.monotonic() + timeout_s
        results: dict[int, Any] = {}
        while len(results) < world_size:
            for rank in range(world_size):
                path = Path(folder) / f"rank{rank}.pkl"
                if rank not in results and path.exists():
                    results[rank] = pickle.loads(path.read_bytes())
            if len(results) == world_size:
                break
            if any(status == "error" for status, _, _ in results.values()):
                # as torchrun does: one failed rank ends the job (peers blocked on it are killed)
                grace = time.monotonic() + 3.0
                while time.monotonic() < grace and len(results) < world_size:
                    time.sleep(0.05)
                    for rank in range(world_size):
                        path = Path(folder) / f"rank{rank}.pkl"
                        if rank not in results and path.exists():
                            results[rank] = pickle.loads(path.read_bytes())
                break
            if time.monotonic() > deadline:
                running = [rank for rank in range(world_size) if rank not in results]
                _kill(context)
                raise TimeoutError(f"ranks {running} did not finish within {timeout_s:.0f} s; killed them.")
            dead = [rank for rank, p in enumerate(context.processes)
                    if not p.is_alive() and rank not in results and not (Path(folder) / f"rank{rank}.pkl").exists()]
            if dead:
                time.sleep(0.2)  # a result file may land just after the exit is seen
                dead = [rank for rank in dead if not (Path(folder) / f"rank{rank}.pkl").exists()]
                if dead:
                    _kill(context)
                    codes = {rank: context.processes[rank].exitcode for rank in dead}
                    raise WorkerError(f"ranks {dead} exited without a result (exit codes {codes}).")
            time.sleep(0.02)
        for rank, p in enumerate(context.processes):
            if rank in results:
                p.join(timeout=10)
        _kill(context)
    errors = [(rank, value) for rank, (status, value, _) in sorted(results.items()) if status == "error"]
    if errors:
        # the first error by time is usually the cause (its peers then lose their connection)
        rank, message = min(errors, key=lambda item: results[item[0]][2])
        unfinished = [r for r in range(world_size) if r not in results]
        killed = f" (ranks {unfinished} were still running and were killed)" if unfinished else ""
        others = "".join(f"\n  rank {r}: {m.splitlines()[0][:200]}" for r, m in errors if r != rank)
        raise WorkerError(f"rank {rank} failed{killed}: {message}" + (f"\nother ranks:{others}" if others else ""))
    return [results[rank][1] for rank in range(world_size)]


def _kill(context: mp.ProcessContext) -> None:
    for process in context.processes:
        if process.is_alive():
            process.kill()
            process.join(timeout=5)
