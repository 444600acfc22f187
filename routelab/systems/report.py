"""``routelab analyze``: a markdown report with plots of everything measurable on one trace.

Sections: balance (per-layer load heatmap, metrics and percentiles across layers), sparsity,
local routing consistency (SRP table, SCH and LRU/LFU/Belady curves), expert-offloading
simulation (hit rate vs cache size per policy, bytes, latency), per-domain routing
divergence, expert-parallel load (per-device load bars, standard EP vs LLEP), batch
scheduling, and the ``serving_summary`` numbers. All numbers also go to ``analysis.json``.
Plots are drawn with matplotlib's object API (no global pyplot state).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from routelab.metrics.balance import layer_balance
from routelab.metrics.depth import depth_summary
from routelab.metrics.locality import (
    SEG_LENGTHS,
    active_experts,
    segment_cache_hit_rates,
    segment_routing_performance,
)
from routelab.metrics.sparsity import sparsity_by_layer
from routelab.metrics.specialization import domain_divergence, mutual_information
from routelab.systems.cache import BandwidthModel, simulate_cache
from routelab.systems.ep import EPCostModel, LLEPConfig, default_devices, simulate_ep
from routelab.systems.scheduling import schedule_trace
from routelab.systems.summary import serving_summary


@dataclass
class AnalysisOptions:
    """Settings of ``analyze`` (defaults follow the specs)."""

    windows: Sequence[int] = SEG_LENGTHS
    sequence_stride: int = 16
    batch_tokens: int = 4096
    ep_batch_tokens: int = 16384
    devices: int | None = None
    prefetch: bool = True
    bandwidth: BandwidthModel = field(default_factory=BandwidthModel)
    ep_model: EPCostModel = field(default_factory=EPCostModel)
    llep: LLEPConfig = field(default_factory=LLEPConfig)
    schedule_batch: int = 8


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _save(fig: Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path.name


def depth_section(trace, data: dict[str, Any]) -> list[str]:  # noqa: ANN001 - TraceLike
    """Markdown of a depth trace: option rates per layer and compute per token (token difficulty)."""
    summary = depth_summary(trace)
    data["depth"] = summary
    options = summary["options"]
    md = ["## Depth decisions", "",
          f"Trace layers hold depth decisions of `{trace.metadata['depth'].get('method')}` "
          f"(mode `{trace.metadata['depth'].get('mode')}`); options {options} cost "
          f"{summary['option_costs']} x one block/FFN run. Execution rate per model layer:", "",
          _table(["layer", *options], [(layer, *(rates[o] for o in options)) for layer, rates in summary["rates"].items()]),
          "",
          "Compute per token (mean option cost over routed layers) is the router's view of token difficulty: "
          f"mean {summary['compute_mean']:.3f}, percentiles {summary['compute_percentiles']}.", ""]
    if summary["compute_by_domain"]:
        md += [_table(["domain", "compute per token"], list(summary["compute_by_domain"].items())), ""]
    if summary["most_compute_tokens"]:
        md += ["Token ids (seen >= 5 times) with the most / least compute:", "",
               _table(["most: token id", "compute", "least: token id", "compute"],
                      [(a, b, c, d) for (a, b), (c, d) in zip(summary["most_compute_tokens"],
                                                              summary["least_compute_tokens"])]), ""]
    return md


def analyze_trace(
    trace,  # noqa: ANN001 - TraceLike
    out_dir: str | Path,
    options: AnalysisOptions | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write ``report.md``, ``analysis.json`` and the PNG plots into ``out_dir``; return the report path."""
    options = options or AnalysisOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    step = progress or (lambda _: None)
    k, num_experts, layers = active_experts(trace), trace.num_experts, tuple(trace.layers)
    data: dict[str, Any] = {"metadata": trace.metadata, "tokens": trace.num_tokens, "layers": list(layers),
                            "num_experts": num_experts, "k_max": trace.k_max, "domains": trace.domain_names}
    md = [f"# Routing analysis: {trace.metadata.get('model', 'trace')}", ""]
    meta_rows = [(key, json.dumps(value) if isinstance(value, (dict, list)) else value)
                 for key, value in trace.metadata.items()]
    md += [_table(["key", "value"], meta_rows), "",
           f"{trace.num_tokens} tokens in {trace.sequence_offsets().size - 1} sequences, {len(layers)} MoE layers, "
           f"{num_experts} experts, k_max = {trace.k_max}, {k} active experts per token (the cache-size unit).", ""]

    if trace.metadata.get("depth"):
        step("depth")
        md += depth_section(trace, data)

    step("balance")
    balance = layer_balance(trace, batch_tokens=options.batch_tokens)
    data["balance"] = {"per_layer": {m: v.tolist() for m, v in balance.per_layer.items()},
                       "per_batch": {m: v.tolist() for m, v in (balance.per_batch or {}).items()},
                       "percentiles": balance.percentiles()}
    fig = Figure(figsize=(max(5, num_experts / 6), max(2.5, len(layers) / 3)))
    ax = fig.add_subplot()
    share = balance.loads / np.maximum(balance.loads.sum(axis=1, keepdims=True), 1) * num_experts
    image = ax.imshow(share, aspect="auto", cmap="viridis")
    ax.set(xlabel="expert", ylabel="layer", title="load / mean load", yticks=range(len(layers)), yticklabels=layers)
    fig.colorbar(image, ax=ax)
    md += ["## Load balance", "", f"![load heatmap]({_save(fig, out / 'load_heatmap.png')})", "",
           "Whole-trace (global) balance per layer; `batch` columns average the same metric over batches of "
           f"{options.batch_tokens} tokens (local balance).", ""]
    rows = [(layer, *(balance.per_layer[m][i] for m in ("max_vio", "cv", "entropy", "gini", "min_max_ratio")),
             int(balance.per_layer["dead_experts"][i]), balance.per_batch["max_vio"][i], balance.per_batch["cv"][i])
            for i, layer in enumerate(layers)]
    header = ["layer", "MaxVio", "CV", "entropy", "Gini", "min/max", "dead", "batch MaxVio", "batch CV"]
    md += [_table(header, rows), ""]
    pct = balance.percentiles()
    md += ["Percentiles across layers:", "",
           _table(["metric", "p0", "p50", "p90", "p100"], [(m, *pct[m].values()) for m in pct]), ""]

    step("sparsity")
    sparsity = sparsity_by_layer(trace, windows=(8, 64))
    data["sparsity"] = sparsity
    md += ["## Activation sparsity (BlockFFN TLS / CLS)", "",
           _table(["layer", "TLS", "CLS(8)", "CLS(64)"],
                  [(layer, s["tls"], s["cls_8"], s["cls_64"]) for layer, s in sparsity.items()]), ""]

    step("SRP")
    windows = [w for w in options.windows if w <= max(np.diff(trace.sequence_offsets()), default=0)]
    srp_model = segment_routing_performance(trace, windows=windows, level="model") if windows else []
    srp_layer = segment_routing_performance(trace, windows=windows, level="layer") if windows else []
    data["srp"] = [{"window": r.window, "level": "model", "srp": r.srp, "theta": r.theta, "act_r": r.act_r,
                    "best_m": r.best_m} for r in srp_model]
    data["srp"] += [{"window": r.window, "level": "layer", "layer": r.layer, "srp": r.srp, "theta": r.theta}
                    for r in srp_layer]
    md += ["## Local routing consistency (moe-lrc)", "",
           "SRP: best F1 of predicting a window's experts from a shared count threshold θ "
           "(higher = more local consistency).", ""]
    srp_rows = []
    for r in srp_model:
        per_layer = [x.srp for x in srp_layer if x.window == r.window]
        srp_rows.append((r.window, r.srp, r.theta, r.act_r, r.best_m, min(per_layer), max(per_layer)))
    if srp_rows:
        fig = Figure(figsize=(6, 3.5))
        ax = fig.add_subplot()
        ax.plot([r[0] for r in srp_rows], [r[1] for r in srp_rows], marker="o", label="model level")
        ax.fill_between([r[0] for r in srp_rows], [r[5] for r in srp_rows], [r[6] for r in srp_rows], alpha=0.25,
                        label="layer range")
        ax.set(xlabel="window W (tokens)", ylabel="SRP (best F1)", title="segment routing best performance",
               ylim=(0, 1.02))
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.legend(fontsize=8)
        md += [f"![SRP]({_save(fig, out / 'srp.png')})", "",
               _table(["W", "SRP (model)", "θ", "act_r", "best_m", "min layer", "max layer"], srp_rows), ""]
    else:
        md += ["No sequence is long enough for the SRP windows.", ""]

    step("SCH")
    curves = segment_cache_hit_rates(trace, future_lens=windows, level="layer", sequence_stride=options.sequence_stride)
    grouped: dict[str, list] = {}
    for c in curves:
        grouped.setdefault(c.policy if c.policy != "sch" else f"SCH L={c.future_len}", []).append(c)
    mean = {name: np.mean([c.hit_rate for c in cs], axis=0) for name, cs in grouped.items()}
    data["sch"] = {name: curve.tolist() for name, curve in mean.items()}
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    multiples = np.arange(1, num_experts + 1) / k
    for name, curve in mean.items():
        ax.plot(multiples, curve, marker="." if name.startswith("SCH") else None,
                linestyle="-" if name.startswith("SCH") else "--", label=name)
    ax.set(xlabel="cache size / k (per layer)", ylabel="hit rate (moe-lrc rules)", title="SCH and baselines",
           ylim=(0, 1.02))
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.legend(fontsize=8)
    md += [f"SCH and LRU/LFU/Belady hit rates, mean over layers, caches restarted per sequence, every "
           f"{options.sequence_stride}th sequence:", "", f"![SCH curves]({_save(fig, out / 'sch_curves.png')})", ""]
    show = [c for c in (k, 2 * k, 4 * k) if c <= num_experts]
    header = ["policy", *[f"C={c} ({c // k}k)" for c in show]]
    md += [_table(header, [(n, *(v[c - 1] for c in show)) for n, v in mean.items()]), ""]

    step("cache simulation")
    prefetch = options.prefetch and len(layers) > 1 and trace.num_tokens >= 4
    sweep = simulate_cache(trace, prefetch=prefetch, model=options.bandwidth)
    data["cache"] = [r.as_row() for r in sweep.results]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for policy in dict.fromkeys(r.policy for r in sweep.results):
        sizes, rates = sweep.curve(policy)
        ax.plot(sizes, rates, marker="o", label=policy)
    ax.set(xlabel="cache size (experts per layer)", ylabel="hit rate (no load needed)",
           title="expert cache: hit rate vs size", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    md += ["## Expert offloading", "", f"![cache hit rate]({_save(fig, out / 'cache_hit_rate.png')})", "",
           f"One cache per layer, one continuous stream of {sweep.tokens} tokens; expert = "
           f"{options.bandwidth.expert_bytes / 1e6:.0f} MB, link {options.bandwidth.bandwidth / 1e9:.0f} GB/s, "
           f"{options.bandwidth.expert_compute_s * 1e3:.2f} ms compute per token-expert.", ""]
    if sweep.predictor_recall is not None:
        md += [f"Layer-ahead predictor: recall {sweep.predictor_recall:.3f}, "
               f"precision {sweep.predictor_precision:.3f}. "
               + " ".join(sweep.notes), ""]
    md += [_table(["policy", "C", "hit rate", "GB moved", "prefetch GB", "ms / token"],
                  [(r.policy, r.cache_size, r.hit_rate, r.bytes_moved / 1e9, r.prefetch_bytes / 1e9,
                    r.latency_per_token_s * 1e3) for r in sweep.results]), ""]

    if trace.domain_names and (trace.tokens().domain >= 0).any():
        step("domains")
        names = trace.domain_names
        divergence = {layer: domain_divergence(trace, layer, normalize="ln2") for layer in layers}
        mi = {layer: mutual_information(trace.tokens().domain, trace.topk_idx(layer), num_experts) for layer in layers}
        data["domains"] = {"jsd_ln2": {layer: d.tolist() for layer, d in divergence.items()},
                           "mutual_information": {layer: list(v) for layer, v in mi.items()}}
        md += ["## Domain specialisation", ""]
        if len(names) > 1:
            fig = Figure(figsize=(6, 3.5))
            ax = fig.add_subplot()
            for a in range(len(names)):
                for b in range(a + 1, len(names)):
                    pair = [divergence[layer][a, b] for layer in layers]
                    ax.plot(layers, pair, marker="o", label=f"{names[a]} vs {names[b]}")
            ax.set(xlabel="layer", ylabel="JSD / ln 2", title="per-domain routing divergence")
            ax.legend(fontsize=8)
            md += [f"![domain divergence]({_save(fig, out / 'domain_divergence.png')})", ""]
        header = ["layer", "I(expert; domain) nats", "I / H(domain)"]
        md += [_table(header, [(layer, *mi[layer]) for layer in layers]), ""]

    step("expert parallelism")
    devices = options.devices or default_devices(num_experts)
    ep = simulate_ep(trace, devices=devices, batch_tokens=min(options.ep_batch_tokens, max(trace.num_tokens, 1)),
                     llep=options.llep, model=options.ep_model)
    data["ep"] = ep.as_dict() | {"device_loads": ep.device_loads.tolist(),
                                 "device_loads_llep": ep.device_loads_llep.tolist()}
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    x = np.arange(devices)
    ax.bar(x - 0.2, ep.device_loads, 0.4, label="standard EP")
    ax.bar(x + 0.2, ep.device_loads_llep, 0.4, label="LLEP")
    ax.set(xlabel="device", ylabel="assignments per step (mean)", title="per-device load")
    ax.legend(fontsize=8)
    md += ["## Expert parallelism", "", f"![EP load]({_save(fig, out / 'ep_device_load.png')})", "",
           f"{devices} devices, steps of {ep.batch_tokens} tokens, "
           f"LLEP λ={options.llep.lam}, α={options.llep.alpha}, "
           f"m={options.llep.min_chunk}.", "",
           _table(["", "standard EP", "LLEP"], [
               ("max / mean device load", ep.max_mean_load, ep.max_mean_load_llep),
               ("modelled time (ms, all steps)", ep.time_s * 1e3, ep.time_s_llep * 1e3),
               ("all-to-all MB per rank and step", ep.a2a_bytes_per_rank / 1e6, ep.a2a_bytes_per_rank_llep / 1e6),
               ("expert weights moved per step (MB)", 0.0, ep.weight_bytes_per_step_llep / 1e6),
           ]), "", f"LLEP speed-up {ep.speedup:.2f}x (LLEP applied in {ep.llep_applied_fraction:.0%} of steps).", ""]

    step("scheduling")
    md += ["## Batch scheduling (ExpertFlow)", "",
           "Distinct experts per batch and layer in arrival order and after greedy regrouping:", ""]
    rows = []
    data["schedule"] = {}
    for unit, batch, pool in (("sequence", options.schedule_batch, None), ("token", 16, 256)):
        schedule = schedule_trace(trace, batch, unit=unit, pool_size=pool)
        data["schedule"][unit] = {"batch": batch, "pool": pool, "cost": schedule.cost,
                                  "arrival_cost": schedule.arrival_cost, "reduction": schedule.reduction}
        rows.append((f"{unit}s, batches of {batch}" + (f", queue of {pool}" if pool else ""),
                     schedule.arrival_experts_per_batch_layer, schedule.experts_per_batch_layer,
                     f"{schedule.reduction:.1%}"))
    md += [_table(["unit", "arrival order", "scheduled", "reduction"], rows), ""]

    step("serving summary")
    summary = serving_summary(trace, devices=devices, batch_tokens=options.ep_batch_tokens, llep=options.llep,
                              ep_model=options.ep_model)
    data["serving_summary"] = summary
    md += ["## Serving summary", "", _table(["quantity", "value"], list(summary.items())), ""]

    (out / "analysis.json").write_text(json.dumps(data, indent=1, default=float))
    report = out / "report.md"
    report.write_text("\n".join(md))
    return report
