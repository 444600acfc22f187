"""Train several claim runs at once, one worker process each (``routelab reproduce --jobs``).

The demo's TinyLM is too small to keep two cores busy from one process: on the 2-core
development machine two runs at one thread each train 1.3x faster together than the same
runs one after the other at two threads (60 steps: 28.4 s for both against 18.3 s for
one). Runs are independent and keyed by their settings' hash, so they parallelise
without coordination: each worker takes the next run from a queue, trains it with
``Runner.train`` (resuming from its checkpoint if it has one) and reports its steps.

Failure and interruption keep the usual promises. A run that raises stops the others at
their next step boundary (each writes a checkpoint) and the error is raised here naming
the run; Ctrl-C does the same and raises ``KeyboardInterrupt``; a worker that dies
without a word (killed, out of memory) is named with its exit code. Never a silent hang.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from routelab.core.errors import RoutelabError
from routelab.lab.claims.runs import RunSpec

STOP_GRACE_S = 60.0  # how long stopped workers may take to reach a step boundary and checkpoint


class RunFailed(RuntimeError):
    """A run trained by a worker process raised an error that cannot be re-raised as itself."""


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker needs to rebuild the parent's ``Runner`` (picklable)."""

    budget_name: str
    corpus_overrides: dict[str, Any]
    cache_dir: str | None
    out: str
    threads: int


def _worker(setup: WorkerSetup, tasks: Any, messages: Any, stop: Any) -> None:
    import torch

    from routelab.core.cpu_allocator import tune_cpu_allocator_from_env
    from routelab.lab.claims.reproduce import open_runner

    # A session of its own: a terminal's Ctrl-C reaches the parent only, which then stops
    # each worker with exactly one SIGINT (train_run defers it to the step boundary; a
    # second one would abort without a checkpoint).
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    torch.set_num_threads(setup.threads)
    quiet = Console(file=open(os.devnull, "w"), stderr=False)
    try:
        tune_cpu_allocator_from_env()
        runner = open_runner(setup.budget_name, setup.corpus_overrides, setup.cache_dir, setup.out)
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which raises it
        messages.put(("error", None, (_picklable(error), traceback.format_exc())))
        return

    def report_step(spec: RunSpec, step: int) -> None:
        if os.getppid() != parent:  # the parent is gone (killed): checkpoint at the next step and stop
            os.kill(os.getpid(), signal.SIGINT)
        messages.put(("step", spec, step))

    while not stop.is_set():
        try:
            spec = tasks.get(timeout=5.0)
        except queue.Empty:
            if os.getppid() != parent:  # the parent is gone: nobody will send more work
                return
            continue
        if spec is None or stop.is_set():
            return
        messages.put(("start", spec, os.getpid()))
        try:
            runner.train(spec, quiet, False, on_step_end=lambda step, spec=spec: report_step(spec, step))
        except KeyboardInterrupt:
            messages.put(("stopped", spec, None))
            return
        except BaseException as error:  # noqa: BLE001 - reported to the parent, which raises it
            messages.put(("error", spec, (_picklable(error), traceback.format_exc())))
            return
        messages.put(("done", spec, None))


def _picklable(error: BaseException) -> BaseException | None:
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - any failure means: send the text instead
        return None
    return error


def train_in_parallel(setup: WorkerSetup, specs: Sequence[RunSpec], jobs: int, console: Console,
                      show_progress: bool, folder_of: Any) -> int:
    """Train ``specs`` on ``jobs`` worker processes; return how many finished.

    ``folder_of(spec)`` names a run's folder (for the messages). Runs are started in the
    order given."""
    context = mp.get_context("spawn")  # fork would copy the parent's OpenMP and tokenizer threads
    tasks, messages, stop = context.Queue(), context.Queue(), context.Event()
    for spec in specs:
        tasks.put(spec)
    workers = [context.Process(target=_worker, args=(setup, tasks, messages, stop), daemon=True)
               for _ in range(min(jobs, len(specs)))]
    for _ in workers:
        tasks.put(None)
    for worker in workers:
        worker.start()
    done, failure = 0, None
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    progress = Progress(*columns, console=console, disable=not show_progress)
    bars: dict[RunSpec, Any] = {}
    started: dict[RunSpec, float] = {}
    begin = time.perf_counter()
    try:
        with progress:
            overall = progress.add_task(f"runs ({len(workers)} at once)", total=len(specs))
            while done < len(specs):
                try:
                    kind, spec, payload = messages.get(timeout=1.0)
                except queue.Empty:
                    _check_alive(workers, messages)
                    continue
                if kind == "start":
                    console.print(f"start {spec.label} -> {folder_of(spec).name} (worker pid {payload})")
                    bars[spec] = progress.add_task(spec.label, total=spec.steps)
                    started[spec] = time.perf_counter()
                elif kind == "step":
                    progress.update(bars[spec], completed=payload)
                elif kind == "done":
                    done += 1
                    progress.update(overall, completed=done)
                    progress.remove_task(bars.pop(spec))
                    now = time.perf_counter()
                    left = (now - begin) / done * (len(specs) - done) / 60
                    console.print(f"finished {spec.label} in {(now - started.pop(spec)) / 60:.1f} min "
                                  f"({done}/{len(specs)}; about {left:.0f} min left)")
                elif kind == "error":
                    failure = (spec, *payload)
                    break
                elif kind == "stopped":  # only after a stop this loop did not ask for
                    raise KeyboardInterrupt
    except BaseException:
        _stop(workers, stop, console)
        raise
    if failure is not None:
        _stop(workers, stop, console)
        spec, error, text = failure
        what = f"run {spec.label}" if spec is not None else "a training worker, starting,"
        if isinstance(error, RoutelabError):  # the same error (a one-line CLI message), naming the run
            try:
                named = type(error)(f"{what}: {error}")
            except TypeError:
                named = error
            raise named from None
        where = f"run {spec.label} ({folder_of(spec)})" if spec is not None else "a training worker, starting,"
        raise RunFailed(f"{where} failed in its worker:\n{text}")
    for worker in workers:
        worker.join()
    return done


def _check_alive(workers: list[Any], messages: Any) -> None:
    """Raise when a worker died without reporting (its queue is empty by now)."""
    for worker in workers:
        if worker.exitcode not in (None, 0) and messages.empty():
            raise RunFailed(f"a training worker (pid {worker.pid}) died with exit code {worker.exitcode} "
                            "without reporting; its run resumes from its last checkpoint when the command is "
                            "run again.")


def _stop(workers: list[Any], stop: Any, console: Console) -> None:
    """Ask every live worker to stop at its next step boundary (it checkpoints), then wait."""
    stop.set()
    live = [w for w in workers if w.is_alive()]
    for worker in live:
        try:
            os.kill(worker.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    if live:
        console.print(f"stopping {len(live)} training worker(s) at their next step (each writes a checkpoint) ...")
    for worker in live:
        worker.join(STOP_GRACE_S)
        if worker.is_alive():
            worker.terminate()
            worker.join()


__all__ = ["RunFailed", "WorkerSetup", "train_in_parallel"]

