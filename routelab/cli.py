"""The ``routelab`` command. Each command group lives in ``routelab/commands/<group>.py``
and exposes ``register(app)``; this module only assembles them."""

from __future__ import annotations

import importlib

import typer

COMMAND_MODULES = (
    "routelab.commands.routers",
    "routelab.commands.lab",
    "routelab.commands.diagnostics",
    "routelab.commands.hf",
    "routelab.commands.queries",
    "routelab.commands.claims",
)

app = typer.Typer(
    name="routelab",
    help="routelab: routing in sparse and modular neural networks (router zoo, MoE layer, lab, diagnostics).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main() -> None:
    """Entry point. Any routelab error a command did not report itself (bad arguments found
    deep in a benchmark, say) ends as one ``error:`` line and exit code 2, not a traceback."""
    from routelab.core.cpu_allocator import tune_cpu_allocator_from_env
    from routelab.core.errors import RoutelabError

    try:
        tune_cpu_allocator_from_env()
        app()
    except RoutelabError as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
