"""``routelab launch``: start a routelab command on N local processes (torch.distributed.run)."""

from __future__ import annotations

import typer

from routelab.commands.common import fail
from routelab.core.errors import ConfigError


def launch_command(
    ctx: typer.Context,
    nproc: int = typer.Option(..., "--nproc", help="Processes to start on this machine (one per GPU, or CPU processes)."),
    max_restarts: int = typer.Option(0, "--max-restarts", help="Restarts of the whole job after a failure (torchrun's)."),
) -> None:
    """Run `routelab ARGS...` on --nproc local processes, as `torchrun --standalone --nproc-per-node N -m routelab ARGS...`.

    Example: routelab launch --nproc 2 train --expert-parallel 2 --steps 100
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}.")
    if not ctx.args:
        raise ConfigError("give the routelab command to run, e.g. `routelab launch --nproc 2 train --expert-parallel 2`.")
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}", "--module", "routelab", *ctx.args]
    )
    try:
        run(args)
    except ChildFailedError as error:
        failed = ", ".join(f"rank {rank} (exit code {f.exitcode})" for rank, f in sorted(error.failures.items()))
        fail(f"the job failed: {failed}; its own error is printed above.")


def register(app: typer.Typer) -> None:
    app.command("launch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(launch_command)


