"""The ``routelab`` command. Each command group lives in ``routelab/commands/<group>.py``
and exposes ``register(app)``; this module only assembles them. How every command fails
(one ``error:`` line on stderr, exit code 2) is decided once, in ``routelab.commands.common``."""

from __future__ import annotations

import importlib

import typer

from routelab.commands.common import RoutelabGroup

COMMAND_MODULES = (
    "routelab.commands.routers",
    "routelab.commands.lab",
    "routelab.commands.diagnostics",
    "routelab.commands.hf",
    "routelab.commands.parallel",
    "routelab.commands.adapters",
    "routelab.commands.queries",
    "routelab.commands.claims",
    "routelab.commands.depth",
)

app = typer.Typer(
    name="routelab",
    cls=RoutelabGroup,
    help="routelab: routing in sparse and modular neural networks (router zoo, MoE layer, lab, diagnostics).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main() -> None:
    """Entry point: tune the CPU allocator (``ROUTELAB_CPU_ALLOCATOR``), then run the command."""
    from routelab.commands.common import error_message
    from routelab.core.cpu_allocator import tune_cpu_allocator_from_env
    from routelab.core.errors import RoutelabError

    try:
        tune_cpu_allocator_from_env()
    except RoutelabError as error:
        typer.echo(f"error: {error_message(error)}", err=True)
        raise SystemExit(2) from None
    app()


if __name__ == "__main__":
    main()
