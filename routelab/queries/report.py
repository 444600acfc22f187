"""Report of a query-routing evaluation, in the conventions of ``routelab compare``:
``results.csv``/``.parquet`` (one row per run), ``summary.csv``/``.parquet`` (mean and sample
std over seeds per dataset x router), ``curves.csv``/``.parquet`` (every operating point),
``leaderboard.json``, one quality-vs-cost plot per dataset and ``report.md``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

LEADERBOARD_COLUMNS = (
    ("apgr", "APGR", 3),
    ("cpt50", "CPT(50%)", 3),
    ("cpt80", "CPT(80%)", 3),
    ("aiq", "AIQ", 4),
    ("oracle_gap", "oracle gap", 4),
    ("best_quality", "best quality", 4),
    ("cost_per_1k_at_best", "$/1k at best", 4),
    ("regret_per_query", "regret/query", 4),
    ("fit_s", "fit s", 2),
    ("queries_per_s", "queries/s", 0),
)
ID_COLUMNS = ("dataset", "router", "preset", "seed", "strong_model", "weak_model")


def numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, router): ``<col>_mean``/``<col>_std`` over seeds; sorted by dataset, then AIQ."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["router"]), []).append(row)
    out = []
    for (dataset, router), group in groups.items():
        agg: dict[str, Any] = {"dataset": dataset, "router": router, "preset": group[0]["preset"], "seeds": len(group)}
        columns = [c for c in dict.fromkeys(k for r in group for k in r) if c not in ID_COLUMNS]
        for column in columns:
            values = [r.get(column) for r in group]
            if not all(numeric(v) for v in values):
                agg[f"{column}_mean"] = agg[f"{column}_std"] = None
                continue
            mean = sum(values) / len(values)
            agg[f"{column}_mean"] = mean
            agg[f"{column}_std"] = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                                    if len(values) > 1 else None)
        out.append(agg)
    order = {d: i for i, d in enumerate(dict.fromkeys(r["dataset"] for r in rows))}
    return sorted(out, key=lambda a: (order[a["dataset"]], -(a.get("aiq_mean") or 0.0)))


def leaderboard_tables(aggregates: list[dict[str, Any]], title: str) -> list[Table]:
    """One rich table per dataset."""
    from routelab.lab.report import fmt_pm

    tables = []
    for dataset in dict.fromkeys(a["dataset"] for a in aggregates):
        table = Table(title=f"{title}: {dataset}")
        table.add_column("#", justify="right")
        table.add_column("router", style="bold cyan")
        for _, name, _ in LEADERBOARD_COLUMNS:
            table.add_column(name, justify="right")
        for rank, agg in enumerate((a for a in aggregates if a["dataset"] == dataset), start=1):
            table.add_row(str(rank), agg["router"], *[fmt_pm(agg, c, d) for c, _, d in LEADERBOARD_COLUMNS])
        tables.append(table)
    return tables


def plot_curves(curves: list[dict[str, Any]], folder: Path) -> dict[str, Path]:
    """``quality_vs_cost_<dataset>.png``: each router's operating points (first seed) and its hull."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from routelab.queries.metrics import upper_hull

    paths = {}
    for dataset in dict.fromkeys(c["dataset"] for c in curves):
        rows = [c for c in curves if c["dataset"] == dataset]
        routers = list(dict.fromkeys(c["router"] for c in rows))
        cmap = plt.get_cmap("tab20")
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, router in enumerate(routers):
            first_seed = min(c["seed"] for c in rows if c["router"] == router)
            pts = [c for c in rows if c["router"] == router and c["seed"] == first_seed]
            cost = np.array([p["cost_per_1k"] for p in pts])
            quality = np.array([p["quality"] for p in pts])
            colour = cmap(i % 20)
            ax.scatter(cost, quality, s=8, color=colour, alpha=0.5)
            hull = upper_hull(cost, quality)
            # the hull is piecewise linear in cost: sample each segment so the log axis shows its true shape
            xs = np.concatenate([np.linspace(a, b, 40) for a, b in zip(hull[:-1, 0], hull[1:, 0])]) if len(hull) > 1 \
                else hull[:, 0]
            ax.plot(xs, np.interp(xs, hull[:, 0], hull[:, 1]), color=colour, linewidth=1.6, label=router,
                    marker="o" if len(hull) == 1 else None)
        ax.set_xscale("log")
        ax.set_xlabel("US dollars per 1,000 queries (log scale)")
        ax.set_ylabel("mean quality (dataset score)")
        ax.set_title(f"Quality vs cost: {dataset} (lines: upper hull of each router's operating points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in dataset)
        path = folder / f"quality_vs_cost_{safe}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[dataset] = path
    return paths


def render_markdown(config, aggregates: list[dict[str, Any]], conventions: dict[str, str], plots: dict[str, Path],
                    wall_time_s: float) -> str:
    from routelab.lab.report import fmt_pm, markdown_table

    routers = [r.key for r in config.routers]
    lines = [
        f"# Query routing: {config.name}",
        "",
        f"{len(routers)} routers x {len(config.datasets)} datasets x {len(config.seeds)} seed(s) {config.seeds}, "
        f"fitted on each dataset's train split and replayed on its test split"
        f"{' (contaminated prompts removed)' if config.decontaminate else ''}. "
        f"Wall time of this invocation: {wall_time_s / 60:.1f} min.",
        "",
    ]
    for dataset in dict.fromkeys(a["dataset"] for a in aggregates):
        group = [a for a in aggregates if a["dataset"] == dataset]
        lines += [f"## {dataset}", "", f"Cost: {conventions.get(dataset, '')}.", ""]
        header = ["#", "router"] + [name for _, name, _ in LEADERBOARD_COLUMNS]
        body = [[str(i), a["router"]] + [fmt_pm(a, c, d) for c, _, d in LEADERBOARD_COLUMNS]
                for i, a in enumerate(group, 1)]
        lines += [markdown_table(header, body), ""]
        if dataset in plots:
            lines += [f"![quality vs cost, {dataset}]({plots[dataset].name})", ""]
    lines += [
        "## Columns",
        "",
        "- APGR, CPT(50%), CPT(80%) (two-model datasets; RouteLLM's definitions): thresholds at the deciles of the "
        "router's strong-win score; APGR = area under quality vs share of strong calls, normalised between the weak "
        "(0) and strong (1) model; CPT(x%) = share of strong calls (0-1) at which x% of the weak-to-strong gap is "
        "recovered (np.interp as in RouteLLM). Bandits: their lambda sweep plus the all-weak/all-strong end points. "
        "Empty for routers with one operating point (cheapest, best-single).",
        "- AIQ (RouterBench): area under the non-decreasing upper hull of the router's (cost, quality) points from its "
        "cheapest point to the cost of always calling the most expensive model, divided by that cost. oracle gap = "
        "AIQ(oracle) - AIQ(router).",
        "- best quality / $/1k at best: the router's highest-quality operating point and its cost per 1,000 queries.",
        "- regret/query (bandits): cumulative regret on the test stream against the best fixed model in hindsight, "
        "per query, averaged over the lambda grid (reward = rescaled score - lambda x relative cost).",
        "- fit s: training time; queries/s: scoring plus one decision for the whole test split (embedding excluded).",
        "",
        "Tables: `results.csv`/`.parquet` (one row per run), `summary.csv`/`.parquet` (mean and std over seeds), "
        "`curves.csv`/`.parquet` (every operating point); per-run files in `runs/`.",
        "",
    ]
    return "\n".join(lines)


def write_report(config, results: list[dict[str, Any]], *, wall_time_s: float) -> dict[str, Any]:
    from routelab.lab.report import write_table

    folder = config.folder
    folder.mkdir(parents=True, exist_ok=True)
    rows = [r["row"] for r in results]
    curves = [c for r in results for c in r["curve"]]
    conventions = {r["row"]["dataset"]: r["cost_convention"] for r in results}
    aggregates = aggregate(rows)
    tables = write_table(rows, folder / "results") + write_table(aggregates, folder / "summary")
    tables += write_table(curves, folder / "curves")
    plots = plot_curves(curves, folder)
    report = folder / "report.md"
    report.write_text(render_markdown(config, aggregates, conventions, plots, wall_time_s))
    (folder / "leaderboard.json").write_text(json.dumps({"aggregates": aggregates}, indent=1))
    return {"report": report, "results": tables, "rows": rows, "aggregates": aggregates, "plots": plots,
            "wall_time_s": wall_time_s}
