"""Report of an adapter-lab comparison: tables (markdown, CSV) and figures.

* ``report.md``: per method, mean target loss and next-token accuracy on held-in and on
  held-out tasks and the effective support size; then every task;
* ``results.csv``: one row per (method, task);
* ``routing_matrix.png``: task x skill routing mass per method (share of the routing
  weight each expert/skill receives on each task's target tokens, mean over layers);
* ``effective_support.png``: mean effective support size per method;
* ``held_in_vs_out.png``: mean loss on held-in vs held-out tasks per method.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def mean_of(per_task: dict[str, Any], key: str) -> float | None:
    values = [v[key] for v in per_task.values() if v.get(key) is not None]
    return float(np.mean(values)) if values else None


def summary_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for method, result in results.items():
        both = {**result["held_in"], **result["held_out"]}
        rows.append({
            "method": method,
            "held_in_loss": mean_of(result["held_in"], "loss"), "held_in_accuracy": mean_of(result["held_in"], "accuracy"),
            "held_out_loss": mean_of(result["held_out"], "loss"),
            "held_out_accuracy": mean_of(result["held_out"], "accuracy"),
            "effective_support": mean_of(both, "effective_support"),
        })
    return rows


def fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_adapter_report(lab: Any, results: dict[str, dict[str, Any]]) -> Path:
    out = Path(lab.out)
    rows = summary_rows(results)
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "split", "task", "loss", "accuracy", "effective_support"])
        for method, result in results.items():
            for split in ("held_in", "held_out"):
                for task, v in result[split].items():
                    writer.writerow([method, split, task, v["loss"], v["accuracy"], v.get("effective_support")])
    figures = [plot_routing_matrix(results, lab, out / "routing_matrix.png"), plot_support(rows, out / "effective_support.png"),
               plot_held_in_out(rows, out / "held_in_vs_out.png")]
    config = lab.config
    lines = [
        "# Adapter routing: held-in vs held-out tasks",
        "",
        f"Frozen base TinyLM (d_model={config.base_model.d_model}, {config.base_model.n_layers} layers, "
        f"{config.base_train.steps} steps on the corpus); LoRA rank {config.rank} on {', '.join(config.targets)}; "
        f"held-in tasks: {', '.join(t.name for t in lab.held_in)}; held-out (compositions): "
        f"{', '.join(t.name for t in lab.held_out)}. Loss and accuracy are on the target tokens of "
        f"{config.eval_examples} validation examples per task (next-token, teacher forcing).",
        "",
        "| method | held-in loss | held-in acc | held-out loss | held-out acc | effective support |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['method']} | {fmt(row['held_in_loss'])} | {fmt(row['held_in_accuracy'])} | "
                     f"{fmt(row['held_out_loss'])} | {fmt(row['held_out_accuracy'])} | {fmt(row['effective_support'], 2)} |")
    lines += ["", "## Per task (loss / accuracy)", ""]
    tasks = [t.name for t in lab.tasks]
    lines.append("| method | " + " | ".join(tasks) + " |")
    lines.append("|---|" + "---:|" * len(tasks))
    for method, result in results.items():
        both = {**result["held_in"], **result["held_out"]}
        cells = [f"{both[t]['loss']:.2f} / {both[t]['accuracy']:.2f}" if t in both else "-" for t in tasks]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if "oracle" in results and results["oracle"].get("oracle_expert"):
        chosen = ", ".join(f"{k} -> {v}" for k, v in results["oracle"]["oracle_expert"].items())
        lines += ["", f"Oracle choice of a held-in expert per held-out task: {chosen}."]
    lines += ["", "Figures: " + ", ".join(f"[{p.name}]({p.name})" for p in figures if p is not None), ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def plot_routing_matrix(results: dict[str, dict[str, Any]], lab: Any, path: Path) -> Path | None:
    panels = []
    for method, result in results.items():
        both = {**result["held_in"], **result["held_out"]}
        rows = [both[t.name]["routing"] for t in lab.tasks if t.name in both]
        if rows and all(r is not None for r in rows):
            panels.append((method, np.asarray(rows)))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 0.35 * len(lab.tasks) + 1.8), squeeze=False)
    for ax, (method, matrix) in zip(axes[0], panels):
        ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(method)
        ax.set_xlabel("expert / skill")
        ax.set_yticks(range(len(lab.tasks)))
        ax.set_yticklabels([t.name for t in lab.tasks] if ax is axes[0][0] else [""] * len(lab.tasks), fontsize=8)
        ax.axhline(len(lab.held_in) - 0.5, color="white", linewidth=1)
    fig.suptitle("routing mass per task (rows below the line: held-out)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_support(rows: list[dict[str, Any]], path: Path) -> Path | None:
    data = [(r["method"], r["effective_support"]) for r in rows if r["effective_support"] is not None]
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar([m for m, _ in data], [v for _, v in data], color="tab:blue")
    ax.set_ylabel("effective support size (1 / sum w^2)")
    ax.set_title("experts effectively mixed per token")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_held_in_out(rows: list[dict[str, Any]], path: Path) -> Path:
    methods = [r["method"] for r in rows]
    x = np.arange(len(methods))
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.bar(x - 0.2, [r["held_in_loss"] or 0 for r in rows], 0.4, label="held-in")
    ax.bar(x + 0.2, [r["held_out_loss"] or 0 for r in rows], 0.4, label="held-out")
    ax.set_xticks(x)
    ax.set_xticklabels(methods, rotation=30, ha="right")
    ax.set_ylabel("target loss")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
