"""``routelab queries list`` and ``routelab queries evaluate``: query -> LLM routing (level 4)."""

from __future__ import annotations

from typing import Any, Optional

import typer
import yaml
from rich.table import Table

from routelab.commands.lab import err_console, friendly_errors, output_console, parse_ints
from routelab.core.errors import ConfigError

queries_app = typer.Typer(help="Query -> LLM routing (level 4): datasets, routers, replay evaluation.",
                          no_args_is_help=True)


@queries_app.command("list")
@friendly_errors
def list_command() -> None:
    """The shipped datasets and the registered query routers."""
    from routelab.queries import list_datasets, list_query_routers

    console = output_console()
    table = Table(title="query-routing datasets (shipped; or pass a CSV/JSONL/Parquet path)")
    for column in ("name", "queries", "models", "train", "test", "score", "cost", "licence"):
        table.add_column(column, overflow="fold")
    for row in list_datasets():
        table.add_row(row["name"], f"{row['queries']:,}", str(row["models"]), f"{row['train']:,}", f"{row['test']:,}",
                      row["score"], row["cost"], row["licence"])
    console.print(table)
    table = Table(title="query routers")
    for column in ("name", "kind", "paper", "options"):
        table.add_column(column, overflow="fold")
    for row in list_query_routers():
        table.add_row(row["name"], row["kind"], row["paper"], row["options"])
    console.print(table)


def parse_router_options(items: list[str] | None, routers: list[str]) -> dict[str, dict[str, Any]]:
    """``ROUTER.KEY=VALUE`` strings to per-router option dicts (values read as YAML scalars)."""
    options: dict[str, dict[str, Any]] = {}
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--option {item!r} must look like ROUTER.KEY=VALUE, e.g. --option knn.k=20.")
        target, value = item.split("=", 1)
        router, key = target.split(".", 1)
        if router not in routers:
            raise ConfigError(f"--option {item!r} names router {router!r}, which is not in --routers {routers}.")
        options.setdefault(router, {})[key.strip()] = yaml.safe_load(value)
    return options


def split_names(value: str | None, flag: str) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise ConfigError(f"{flag} {value!r} names nothing; give comma-separated names.")
    return names


@queries_app.command("evaluate")
@friendly_errors
def evaluate_command(
    datasets: Optional[str] = typer.Option(None, "--datasets", help="Comma-separated shipped datasets and/or table "
                                           "paths (default: every shipped dataset)."),
    routers: Optional[str] = typer.Option(None, "--routers", help="Comma-separated query routers (default: all)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2 (default 0)."),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", help="Router option ROUTER.KEY=VALUE "
                                               "(repeatable), e.g. -o knn.k=20."),
    name: str = typer.Option("queries", "--name", help="Evaluation name (results in <out-dir>/<name>/)."),
    out_dir: str = typer.Option("runs", "--out-dir", help="Parent folder of evaluations."),
    decontaminate: bool = typer.Option(False, "--decontaminate", help="Drop prompts RouteLLM flags as contaminated."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Fit every router on each dataset's train split, replay the test split, write the report.

    Resumable: finished runs are reused, so an interrupted evaluation continues where it stopped."""
    from routelab.queries.experiment import DEFAULT_ROUTERS, QueryExperiment, RouterSpec, run_query_experiment
    from routelab.queries.loaders import DATASETS
    from routelab.queries.report import leaderboard_tables

    router_names = split_names(routers, "--routers") or list(DEFAULT_ROUTERS)
    per_router = parse_router_options(option, router_names)
    config = QueryExperiment(
        datasets=split_names(datasets, "--datasets") or list(DATASETS),
        routers=[RouterSpec(r, per_router.get(r, {})) for r in router_names],
        seeds=parse_ints(seeds, "--seeds") or [0], name=name, out_dir=out_dir, decontaminate=decontaminate,
    )
    err_console.print(f"routelab queries evaluate: {len(config.datasets)} dataset(s) x {len(config.routers)} "
                      f"router(s) x seeds {config.seeds} -> {config.folder}/")
    result = run_query_experiment(config, console=err_console, show_progress=not no_progress)
    console = output_console()
    for table in leaderboard_tables(result["aggregates"], "query routing"):
        console.print(table)
    console.print(f"wall time: {result['wall_time_s']:.0f} s. Report: {result['report']} "
                  f"(plots and tables in {result['report'].parent}/)")


def register(app: typer.Typer) -> None:
    app.add_typer(queries_app, name="queries")
