"""``routelab queries list`` and ``routelab queries evaluate``: query -> LLM routing (level 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.table import Table

from routelab.commands.common import parse_int_list
from routelab.commands.lab import err_console, output_console
from routelab.core.errors import ConfigError

queries_app = typer.Typer(help="Query -> LLM routing (level 4): datasets, routers, replay evaluation.",
                          no_args_is_help=True)


@queries_app.command("list")
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
    """``ROUTER.KEY=VALUE`` strings (ROUTER = a router's name or label) to per-router option dicts
    (values read as YAML scalars)."""
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


def router_specs(entries: Any, where: str) -> list:
    """Router entries of a config file: names, or mappings ``{name, label, options}``."""
    from routelab.queries.experiment import RouterSpec

    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: 'routers' must be a non-empty list of names or {{name, label, options}} entries.")
    specs = []
    for entry in entries:
        if isinstance(entry, str):
            specs.append(RouterSpec(entry))
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str) and set(entry) <= {"name", "label", "options"}:
            specs.append(RouterSpec(entry["name"], dict(entry.get("options") or {}), entry.get("label")))
        else:
            raise ConfigError(f"{where}: router entry {entry!r} must be a name or a mapping with keys name, label, "
                              "options.")
    return specs


CONFIG_KEYS = {"name", "datasets", "routers", "seeds", "out_dir", "decontaminate"}


@queries_app.command("evaluate")
def evaluate_command(
    config_file: Optional[Path] = typer.Argument(None, help="Evaluation file (.yaml/.yml/.toml: name, datasets, "
                                                 "routers, seeds, out_dir, decontaminate); flags override it."),
    datasets: Optional[str] = typer.Option(None, "--datasets", help="Comma-separated shipped datasets and/or table "
                                           "paths (default: every shipped dataset)."),
    routers: Optional[str] = typer.Option(None, "--routers", help="Comma-separated query routers (default: all)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2 (default 0)."),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", help="Router option ROUTER.KEY=VALUE "
                                               "(repeatable), e.g. -o knn.k=20."),
    name: Optional[str] = typer.Option(None, "--name", help="Evaluation name (results in <out-dir>/<name>/; "
                                       "default queries)."),
    out_dir: Optional[str] = typer.Option(None, "--out-dir", help="Parent folder of evaluations (default runs)."),
    decontaminate: Optional[bool] = typer.Option(None, "--decontaminate/--keep-contaminated",
                                                 help="Drop prompts RouteLLM flags as contaminated (default keep)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Fit every router on each dataset's train split, replay the test split, write the report.

    Resumable: finished runs are reused, so an interrupted evaluation continues where it stopped."""
    from routelab.queries.experiment import DEFAULT_ROUTERS, QueryExperiment, RouterSpec, run_query_experiment
    from routelab.queries.loaders import DATASETS
    from routelab.queries.report import leaderboard_tables

    settings: dict[str, Any] = {}
    where = "flags"
    if config_file is not None:
        from routelab.lab.experiment import read_config_file

        settings = read_config_file(config_file)
        where = f"evaluation file {str(config_file)!r}"
        unknown = sorted(set(settings) - CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(CONFIG_KEYS)}.")
    if routers is not None:
        specs = [RouterSpec(r) for r in split_names(routers, "--routers")]
    elif "routers" in settings:
        specs = router_specs(settings["routers"], where)
    else:
        specs = [RouterSpec(r) for r in DEFAULT_ROUTERS]
    per_router = parse_router_options(option, [spec.key for spec in specs])
    for spec in specs:
        spec.options.update(per_router.get(spec.key, {}))
    file_datasets = settings.get("datasets")
    if file_datasets is not None and not (isinstance(file_datasets, list) and all(isinstance(d, str) for d in file_datasets)):
        raise ConfigError(f"{where}: 'datasets' must be a list of dataset names or table paths.")
    file_seeds = settings.get("seeds")
    if file_seeds is not None and not (isinstance(file_seeds, list) and all(isinstance(v, int) for v in file_seeds)):
        raise ConfigError(f"{where}: 'seeds' must be a list of integers.")
    config = QueryExperiment(
        datasets=split_names(datasets, "--datasets") or file_datasets or list(DATASETS),
        routers=specs,
        seeds=parse_int_list(seeds, "--seeds", minimum=0) or file_seeds or [0],
        name=name or str(settings.get("name", "queries")),
        out_dir=out_dir or str(settings.get("out_dir", "runs")),
        decontaminate=bool(settings.get("decontaminate", False)) if decontaminate is None else decontaminate,
    )
    err_console.print(f"routelab queries evaluate: {len(config.datasets)} dataset(s) x {len(config.routers)} "
                      f"router(s) x seeds {config.seeds} -> {config.folder}/")
    from routelab.core.run_lock import FolderLock

    with FolderLock(config.folder, "query evaluation folder"):
        result = run_query_experiment(config, console=err_console, show_progress=not no_progress)
    console = output_console()
    for table in leaderboard_tables(result["aggregates"], "query routing"):
        console.print(table)
    console.print(f"wall time: {result['wall_time_s']:.0f} s. Report: {result['report']} "
                  f"(plots and tables in {result['report'].parent}/)")


def register(app: typer.Typer) -> None:
    app.add_typer(queries_app, name="queries")
