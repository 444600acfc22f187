"""``routelab list`` and ``routelab bench``."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table


WIDE_TERMINAL = 160  # columns below which `list -v` prints plain text instead of a table


def option_text(options: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


def presets_plain_text(presets) -> str:  # noqa: ANN001 - the preset registry
    """Every preset with its paper and every option with its default, one block per preset, uncut."""
    blocks = [f"{info.name}: {info.description} ({info.paper})\n  options: {option_text(info.options())}\n"
              for info in presets]
    return "\n".join(blocks)


def list_command(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show each preset's options and defaults."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a markdown table of presets, parts and defaults."),
) -> None:
    """List every router preset with its paper."""
    from routelab.routers.registry import PRESETS

    if markdown:
        from routelab.routers.describe import presets_markdown

        typer.echo(presets_markdown(), nl=False)
        return

    console = Console()
    if verbose and (not console.is_terminal or console.width < WIDE_TERMINAL):
        typer.echo(presets_plain_text(PRESETS), nl=False)  # never cut: piped, or too narrow for the table
        return
    table = Table(title=f"routelab routers ({len(PRESETS)} presets)", show_lines=verbose)
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("description")
    table.add_column("paper", style="dim")
    if verbose:
        table.add_column("options (defaults)", overflow="fold")
    for info in PRESETS:
        row = [info.name, info.description, info.paper]
        if verbose:
            row.append(option_text(info.options()))
        table.add_row(*row)
    console.print(table)


def bench_command(
    routers: str = typer.Option("mixtral", "--routers", help="Comma-separated presets, or 'all' for the router-cost table."),
    shapes: str = typer.Option("coarse,fine", "--shapes", help="Comma-separated shapes: coarse (E=8,k=2,h=1024), fine (E=64,k=8,h=128)."),
    dtypes: str = typer.Option("float32,bfloat16", "--dtypes", help="Comma-separated dtypes."),
    tokens: int = typer.Option(4096, "--tokens", min=1, help="Tokens per forward."),
    seq_len: int = typer.Option(1024, "--seq-len", min=1, help="Sequence length for the router-cost table (tokens = batch x seq_len)."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed repetitions (the median is reported)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer tokens and repeats (a smoke run)."),
) -> None:
    """Time the MoE layer (forward+backward) against the ideal grouped GEMM, a naive loop and a dense FFN."""
    from routelab.bench.layer import run_layer_benchmark, run_router_cost_benchmark

    console = Console()
    if quick:
        tokens, repeats = min(tokens, 1024), min(repeats, 2)
    shape_names = [s.strip() for s in shapes.split(",") if s.strip()]
    dtype_names = [d.strip() for d in dtypes.split(",") if d.strip()]
    if routers.strip() == "all" or "," in routers:
        if tokens > seq_len and tokens % seq_len:
            from routelab.core.errors import ConfigError

            raise ConfigError(
                f"--tokens {tokens} is not a whole number of --seq-len {seq_len} sequences; "
                f"use --tokens {tokens // seq_len * seq_len} or another multiple of {seq_len}."
            )
        names = None if routers.strip() == "all" else [r.strip() for r in routers.split(",")]
        run_router_cost_benchmark(names, shape_names, tokens=tokens, repeats=repeats, seq_len=seq_len, console=console)
    else:
        run_layer_benchmark(routers.strip(), shape_names, dtype_names, tokens=tokens, repeats=repeats, console=console)


def register(app: typer.Typer) -> None:
    app.command("list")(list_command)
    app.command("bench")(bench_command)
