"""The comparison report: results tables (CSV, Parquet), a markdown report with plots, and
the leaderboard.

Every number comes from the runs' own files: the registered run metrics
(``routelab.lab.run_metrics``) read ``metrics.jsonl`` / ``summary.json`` / the probe
routing, one row per run; per-router rows aggregate them as mean and sample standard
deviation over seeds.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from routelab.lab.compute import add_equal_flops, depth_mode_points, plot_quality_vs_compute
from routelab.lab.data import PreparedCorpus
from routelab.lab.config import ExperimentConfig
from routelab.lab.plots import plot_all
from routelab.lab.equivalence import tost
from routelab.lab.run_metrics import RunRecord, run_columns
from routelab.lab.seed_noise import NoiseBand, gap_label, noise_band

ID_COLUMNS = ("router", "preset", "seed")
LEADERBOARD_COLUMNS = (
    ("val_loss", "val loss", 4),
    ("val_ppl", "val ppl", 2),
    ("mflops_per_token", "MFLOPs/tok", 3),
    ("loss_at_equal_flops", "loss @ equal FLOPs", 4),
    ("max_vio_avg", "MaxVio avg", 3),
    ("max_vio_final", "MaxVio final", 3),
    ("cv_final", "CV", 3),
    ("dead_experts_final", "dead", 1),
    ("drop_rate_final", "drop", 3),
    ("active_experts_per_token", "experts/tok", 2),
    ("fluctuation_final", "fluct. final", 3),
    ("tokens_per_s", "tok/s", 0),
)

SERVING_TABLE_COLUMNS = (
    ("sch_2k", "SCH @2k", 3),
    ("lru_hit_2k", "LRU hit @2k", 3),
    ("lru_serving_hit_2k", "LRU serving hit", 3),
    ("ep_max_mean", "EP max/mean", 3),
    ("ep_max_mean_llep", "EP max/mean LLEP", 3),
    ("llep_speedup", "LLEP speed-up", 2),
)


def numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def aggregate(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Per router: ``<col>_mean``, ``<col>_std`` (sample std, None with one seed) and ``seeds``."""
    out = []
    for key in keys:
        group = [r for r in rows if r["router"] == key]
        agg: dict[str, Any] = {"router": key, "preset": group[0]["preset"], "seeds": len(group)}
        for column in group[0]:
            if column in ID_COLUMNS:
                continue
            values = [r.get(column) for r in group]
            if not all(numeric(v) for v in values):
                agg[f"{column}_mean"], agg[f"{column}_std"] = None, None
                continue
            mean = sum(values) / len(values)
            agg[f"{column}_mean"] = mean
            agg[f"{column}_std"] = (
                math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
            )
        out.append(agg)
    return sorted(out, key=lambda a: (a.get("val_loss_mean") is None, a.get("val_loss_mean") or 0.0))


def equivalence(rows: list[dict[str, Any]], config: ExperimentConfig) -> list[dict[str, Any]]:
    """TOST of every router against the baseline on ``config.tost.metric`` (>= 2 seeds)."""
    if len(config.seeds) < 2:
        return []
    settings = config.tost
    metric = settings.metric

    def values(key: str) -> list[float]:
        by_seed = {r["seed"]: r[metric] for r in rows if r["router"] == key}
        return [by_seed[s] for s in config.seeds]

    baseline = values(config.baseline_key)
    results = []
    for entry in config.routers:
        if entry.key == config.baseline_key:
            continue
        result = tost(values(entry.key), baseline, settings.margin, alpha=settings.alpha, test=settings.test)
        results.append({"router": entry.key, "baseline": config.baseline_key, "metric": metric, **result.to_dict()})
    return results


def write_table(rows: list[dict[str, Any]], stem: Path) -> list[Path]:
    """``stem.csv`` and ``stem.parquet`` of ``rows`` (columns: the union, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)
    csv_path = stem.with_suffix(".csv")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c) for c in columns})
    parquet_path = stem.with_suffix(".parquet")
    pq.write_table(pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]), parquet_path)
    return [csv_path, parquet_path]


def fmt(value: Any, digits: int) -> str:
    if not numeric(value):
        return "-"
    return f"{value:,.{digits}f}"


def fmt_pm(agg: dict[str, Any], column: str, digits: int) -> str:
    mean, std = agg.get(f"{column}_mean"), agg.get(f"{column}_std")
    if not numeric(mean):
        return "-"
    return fmt(mean, digits) + (f" ± {fmt(std, digits)}" if numeric(std) else "")


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def leaderboard_table(
    aggregates: list[dict[str, Any]], tost_rows: list[dict[str, Any]], title: str, noise: NoiseBand | None = None
) -> Table:
    """The rich leaderboard printed by ``compare`` and ``demo``; the "gap to #1" column marks
    gaps within seed noise (``routelab.lab.seed_noise``)."""
    table = Table(title=title, caption=noise.describe() if noise is not None else None)
    table.add_column("#", justify="right")
    table.add_column("router", style="bold cyan")
    for _, name, _ in LEADERBOARD_COLUMNS:
        table.add_column(name, justify="right")
    table.add_column("gap to #1", justify="right")
    if tost_rows:
        table.add_column("TOST p", justify="right")
    p_values = {r["router"]: r for r in tost_rows}
    for rank, agg in enumerate(aggregates, start=1):
        cells = [str(rank), agg["router"]] + [fmt_pm(agg, c, d) for c, _, d in LEADERBOARD_COLUMNS]
        cells.append(gap_label(agg, aggregates[0], noise))
        if tost_rows:
            result = p_values.get(agg["router"])
            cells.append("baseline" if result is None else f"{result['p_value']:.3f}" + (" ≡" if result["equivalent"] else ""))
        table.add_row(*cells)
    return table


def has_serving(aggregates: list[dict[str, Any]]) -> bool:
    return any(numeric(a.get("sch_2k_mean")) for a in aggregates)


def serving_table(aggregates: list[dict[str, Any]], title: str) -> Table | None:
    """The serving columns (cache hit rates, expert-parallel load) per router, if any run has them."""
    if not has_serving(aggregates):
        return None
    table = Table(title=title)
    table.add_column("router", style="bold cyan")
    for _, name, _ in SERVING_TABLE_COLUMNS:
        table.add_column(name, justify="right")
    for agg in aggregates:
        table.add_row(agg["router"], *[fmt_pm(agg, c, d) for c, _, d in SERVING_TABLE_COLUMNS])
    return table


def render_markdown(
    config: ExperimentConfig,
    corpus: PreparedCorpus,
    aggregates: list[dict[str, Any]],
    tost_rows: list[dict[str, Any]],
    records: list[RunRecord],
    plots: dict[str, Path],
    wall_time_s: float,
    noise: NoiseBand | None = None,
    flops_budget: float | None = None,
) -> str:
    first = records[0].summary
    domains = corpus.domains
    train = config.train
    lines = [
        f"# Router comparison: {config.name}",
        "",
        f"{len(config.routers)} routers x {len(config.seeds)} seed(s) {config.seeds}, each trained on the same data "
        f"for {train.steps} steps x {train.tokens_per_step:,} tokens = {train.steps * train.tokens_per_step:,} tokens "
        f"(precision {first.get('precision')}). Wall time of this invocation: {wall_time_s / 60:.1f} min.",
        "",
        f"- Model: TinyLM d_model={config.model.d_model}, {config.model.n_layers} layers, {config.model.n_heads} heads, "
        f"{config.model.num_experts} experts, top_k={config.model.top_k}, expert width "
        f"{config.model.expert_d_hidden or config.model.d_ff or 4 * config.model.d_model}; "
        f"{first['params_total']:,} parameters, {first['params_active']:,} active per token.",
        f"- Corpus: {corpus.meta['source']!r}, domains {domains}, {corpus.meta['num_tokens']['train']:,} training / "
        f"{corpus.meta['num_tokens']['val']:,} validation tokens, byte-level BPE vocabulary {corpus.vocab_size} "
        f"(content hash {corpus.content_hash[:12]}).",
        f"- Validation: {train.eval_tokens:,} tokens every {train.eval_every} steps; routing probe: "
        f"{train.probe_sequences} sequences of {train.seq_len} tokens.",
        "",
        "## Leaderboard (mean ± std over seeds, sorted by validation loss)",
        "",
    ]
    header = ["#", "router"] + [name for _, name, _ in LEADERBOARD_COLUMNS] + ["gap to #1"]
    body = [[str(i), a["router"]] + [fmt_pm(a, c, d) for c, _, d in LEADERBOARD_COLUMNS]
            + [gap_label(a, aggregates[0], noise)] for i, a in enumerate(aggregates, 1)]
    lines += [markdown_table(header, body), ""]
    lines += [noise.describe() + "." if noise is not None else
              "With one seed and no reference seed noise for these settings, no gap is marked as within noise.", ""]
    lines += ["## Validation loss per domain", ""]
    header = ["router"] + domains
    body = [[a["router"]] + [fmt_pm(a, f"val_loss_{d}", 4) for d in domains] for a in aggregates]
    lines += [markdown_table(header, body), ""]
    if has_serving(aggregates):
        lines += [
            "## Serving (final validation routing)",
            "",
            "`routelab.systems.summary.serving_summary` of each run's routing of the validation windows: "
            "SCH and LRU segment-cache hit rates at a cache of twice the active experts per layer, LRU hit "
            "rate of one continuous stream per layer, device max/mean token load under expert parallelism "
            "without and with LLEP, and the modelled LLEP step-time speed-up.",
            "",
        ]
        header = ["router"] + [name for _, name, _ in SERVING_TABLE_COLUMNS]
        body = [[a["router"]] + [fmt_pm(a, c, d) for c, _, d in SERVING_TABLE_COLUMNS] for a in aggregates]
        lines += [markdown_table(header, body), ""]
    lines += compute_section(records, flops_budget)
    if tost_rows:
        t = config.tost
        lines += [
            f"## Equivalence with the baseline ({config.baseline_key})",
            "",
            f"Two one-sided tests ({t.test}) on {t.metric}, margin ±{t.margin}, alpha {t.alpha}: a router is "
            f"equivalent when p < {t.alpha} (its {100 * (1 - 2 * t.alpha):.0f}% CI of the difference lies inside the margin).",
            "",
        ]
        header = ["router", "difference", f"{100 * (1 - 2 * t.alpha):.0f}% CI", "p (TOST)", "equivalent"]
        body = [
            [r["router"], f"{r['difference']:+.4f}", f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]", f"{r['p_value']:.4f}",
             "yes" if r["equivalent"] else "no"]
            for r in tost_rows
        ]
        lines += [markdown_table(header, body), ""]
    elif len(config.seeds) < 2:
        lines += ["Equivalence tests (TOST) need at least two seeds; run with more seeds to get them.", ""]
    titles = {
        "val_loss": "Validation loss",
        "max_vio": "Load imbalance (MaxVio) during training",
        "fluctuation": "Routing fluctuation",
        "expert_load": "Expert load per layer",
        "compute": "Quality vs compute",
    }
    lines += ["## Plots", ""]
    for name, path in plots.items():
        lines += [f"### {titles[name]}", "", f"![{titles[name]}]({path.name})", ""]
    lines += [
        "## Columns",
        "",
        "- val loss / ppl: final evaluation on the fixed validation windows (nats per token).",
        "- MaxVio avg: mean over training steps of the per-batch (max load - mean load) / mean load, averaged over "
        "MoE layers; MaxVio final and CV: the same over the whole validation set at the end.",
        "- dead: experts with no token on the validation set (summed over layers); drop: share of selected "
        "assignments dropped by capacity; experts/tok: routed experts per token.",
        "- MFLOPs/tok: analytic forward FLOPs per token actually executed at the final evaluation (skipped blocks, "
        "small FFNs and unselected experts cost nothing); loss @ equal FLOPs: validation loss interpolated at the "
        "smallest training-FLOP budget of the experiment's runs (training FLOPs = 3 x forward).",
        "- fluct. final: share of (probe token, layer) pairs whose expert set changed since the previous evaluation.",
        "- tok/s: training tokens per second of optimizer-step time (evaluation excluded); all runs on one machine.",
        "- expert-choice selects tokens per sequence, non-causally: its validation loss uses routing that sees "
        "the whole sequence, as in its paper, which a left-to-right decoder could not do.",
        "",
        "## Runs",
        "",
        markdown_table(["router", "seed", "folder"], [[r.key, str(r.seed), f"`{r.folder}`"] for r in records]),
        "",
        "Per-run metrics: `metrics.jsonl`; final weights: `model.pt` (`routelab.lab.checkpoint.load_model`); "
        "probe routing at every evaluation: `probe_routing.npz`; routing of the validation windows at the end: "
        "`val_routing.npz`. Tables: `results.csv`/`.parquet` (one row per run) "
        "and `summary.csv`/`.parquet` (per router).",
        "",
    ]
    return "\n".join(lines)


def compute_section(records: list[RunRecord], flops_budget: float | None) -> list[str]:
    """The quality-vs-compute text: the common budget and every depth mode's loss and FLOPs."""
    lines = ["## Quality vs compute", ""]
    if flops_budget is not None:
        lines += [f"Loss at equal FLOPs is read at {flops_budget / 1e12:.2f} training TFLOPs (the smallest run's total).", ""]
    points = depth_mode_points(records)
    if points:
        lines += [
            "Depth routers evaluated under each decision rule on the first validation batches "
            "(causal: decided from each token's own past, usable for left-to-right decoding):",
            "",
            markdown_table(["run:mode", "val loss", "MFLOPs/tok", "causal"],
                           [[label, f"{loss:.4f}", f"{mflops:.3f}", "yes" if causal else "no"]
                            for label, mflops, loss, causal in points]),
            "",
        ]
    return lines


def write_report(
    config: ExperimentConfig,
    corpus: PreparedCorpus,
    runs: list[dict[str, Any]],
    *,
    wall_time_s: float,
    console: Console | None = None,
) -> dict[str, Any]:
    """Write results tables, plots and ``report.md`` into the experiment folder.

    Returns ``{"report", "results", "rows", "aggregates", "tost", "plots", "wall_time_s"}``.
    """
    folder = config.folder
    folder.mkdir(parents=True, exist_ok=True)
    records = [RunRecord.load(r["key"], r["router"], r["seed"], r["folder"]) for r in runs]
    rows = [{"router": rec.key, "preset": rec.router, "seed": rec.seed, **run_columns(rec)} for rec in records]
    keys = [entry.key for entry in config.routers]
    budget = add_equal_flops(rows, records)
    aggregates = aggregate(rows, keys)
    tost_rows = equivalence(rows, config)
    tables = write_table(rows, folder / "results") + write_table(aggregates, folder / "summary")
    if tost_rows:
        tables += write_table(tost_rows, folder / "tost")
    plots = plot_all(records, folder)
    compute_plot = plot_quality_vs_compute(records, folder / "quality_vs_compute.png")
    if compute_plot is not None:
        plots["compute"] = compute_plot
    report = folder / "report.md"
    noise = noise_band(aggregates, config.seed_noise_std)
    report.write_text(render_markdown(config, corpus, aggregates, tost_rows, records, plots, wall_time_s, noise, budget))
    (folder / "leaderboard.json").write_text(json.dumps({"aggregates": aggregates, "tost": tost_rows}, indent=1))
    return {
        "report": report,
        "results": tables,
        "rows": rows,
        "aggregates": aggregates,
        "tost": tost_rows,
        "plots": plots,
        "wall_time_s": wall_time_s,
        "noise": noise,
    }
