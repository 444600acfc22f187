"""Routers x datasets x seeds, resumable: every finished run is a JSON file that a rerun reuses.

Results go to ``<out_dir>/<name>/``: ``runs/<dataset>/<router>-seed<k>.json`` (one per run),
then the report (``routelab.queries.report``). A run whose file exists with the same settings
is not repeated, so an interrupted evaluation continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from routelab.core.errors import ConfigError
from routelab.queries.base import ROUTERS, create_query_router
from routelab.queries.loaders import resolve_dataset

DEFAULT_ROUTERS = ("random", "cheapest", "best-single", "oracle", "knn", "mlp", "logistic", "mf", "sw-ranking",
                   "cascade", "linucb", "thompson")


@dataclass
class RouterSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class QueryExperiment:
    """What to evaluate: shipped dataset names (or table paths), routers, seeds."""

    datasets: list[str]
    routers: list[RouterSpec]
    seeds: list[int] = field(default_factory=lambda: [0])
    name: str = "queries"
    out_dir: str = "runs"
    decontaminate: bool = False

    def __post_init__(self) -> None:
        if not self.datasets or not self.routers or not self.seeds:
            raise ConfigError("a query-routing evaluation needs at least one dataset, router and seed.")
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"--name {self.name!r} may only hold letters, digits, '-', '_' and '.'.")
        keys = [r.key for r in self.routers]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"router labels repeat: {keys}; give each a distinct label.")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds repeat: {self.seeds}.")
        for spec in self.routers:
            create_query_router(spec.name, seed=0, **spec.options)  # unknown names/options fail before any work
        for dataset in self.datasets:
            check_dataset_name(dataset)

    @property
    def folder(self) -> Path:
        return Path(self.out_dir) / self.name

    def run_file(self, dataset: str, spec: RouterSpec, seed: int) -> Path:
        safe = Path(dataset).stem if Path(dataset).suffix else dataset
        return self.folder / "runs" / safe / f"{spec.key}-seed{seed}.json"


def check_dataset_name(name: str) -> None:
    """A shipped dataset or an existing table file, else a ``ConfigError`` naming the choices."""
    from routelab.core.errors import unknown_name
    from routelab.queries.loaders import DATASETS, TABLE_SUFFIXES

    if name in DATASETS:
        return
    path = Path(name)
    if path.suffix.lower() in TABLE_SUFFIXES:
        if not path.is_file():
            raise ConfigError(f"--datasets: table file {name!r} does not exist.")
        return
    raise unknown_name("dataset", "--datasets", name, DATASETS)


def resolved_options(spec: RouterSpec) -> dict[str, Any]:
    """The router's options with its defaults filled in (a changed default reruns the run)."""
    import inspect

    cls = ROUTERS.get(spec.name)
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k not in ("self", "seed")}
    return {**defaults, **spec.options}


def settings_hash(dataset: str, spec: RouterSpec, seed: int, decontaminate: bool) -> str:
    text = json.dumps({"dataset": dataset, "router": asdict(spec), "options": resolved_options(spec), "seed": seed,
                       "decontaminate": decontaminate, "format": 1}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_query_experiment(config: QueryExperiment, *, console: Console | None = None, show_progress: bool = True
                         ) -> dict[str, Any]:
    """Evaluate every (dataset, router, seed) not done yet, then write the report."""
    from routelab.queries.evaluate import prepare
    from routelab.queries.report import write_report

    console = console or Console(stderr=True)
    start = time.perf_counter()
    config.folder.mkdir(parents=True, exist_ok=True)
    jobs = [(d, s, r) for d in config.datasets for s in config.seeds for r in config.routers]
    results: list[dict[str, Any]] = []
    loaded: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not show_progress) as progress:
        task = progress.add_task("query routers", total=len(jobs))
        prepared_for: tuple[str, int] | None = None
        prepared = None
        for dataset_name, seed, spec in jobs:
            path = config.run_file(dataset_name, spec, seed)
            digest = settings_hash(dataset_name, spec, seed, config.decontaminate)
            if path.is_file():
                saved = json.loads(path.read_text())
                if saved.get("settings") == digest:
                    results.append(saved)
                    progress.advance(task)
                    continue
            progress.update(task, description=f"{dataset_name} {spec.key} seed {seed}")
            if dataset_name not in loaded:
                loaded[dataset_name] = resolve_dataset(dataset_name, decontaminate=config.decontaminate)
            if prepared_for != (dataset_name, seed):
                prepared = prepare(loaded[dataset_name], seed)
                prepared_for = (dataset_name, seed)
            from routelab.queries.evaluate import evaluate_router

            row, curve = evaluate_router(prepared, spec.name, spec.options, label=spec.key)
            saved = {"settings": digest, "row": row, "curve": curve,
                     "cost_convention": loaded[dataset_name].cost_convention}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(saved))
            tmp.replace(path)
            results.append(saved)
            progress.advance(task)
    return write_report(config, results, wall_time_s=time.perf_counter() - start)

