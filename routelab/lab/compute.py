"""Quality against compute: the analytic FLOPs each run executed, its validation loss at an
equal training-FLOP budget, and the quality-vs-compute plot of ``routelab compare``.

* ``mflops_per_token``: forward MFLOPs per token actually executed at the final evaluation
  (``routelab.depth.flops``: skipped blocks, small FFNs and unused experts cost nothing);
* ``train_pflops``: training compute, 3 x the forward FLOPs of every training token;
* ``loss_at_equal_flops``: each run's validation loss interpolated (linearly in training
  FLOPs between evaluations) at the smallest training budget among the experiment's runs,
  so a run that spends fewer FLOPs per token is compared with the others at the point
  where they had spent as much compute as it did in total.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from routelab.depth.flops import TRAIN_FLOPS_FACTOR  # noqa: E402
from routelab.lab.run_metrics import MetricValues, RunRecord, register_run_metric  # noqa: E402


def training_flops_curve(run: RunRecord) -> tuple[np.ndarray, np.ndarray]:
    """(cumulative training FLOPs, validation loss) at every evaluation of a run."""
    cumulative, previous_tokens, at_step = 0.0, 0, {}
    for row in run.train_rows:
        tokens = int(row["tokens"])
        cumulative += TRAIN_FLOPS_FACTOR * float(row.get("flops_per_token") or 0.0) * (tokens - previous_tokens)
        previous_tokens = tokens
        at_step[row["step"]] = cumulative
    steps = sorted(at_step)
    flops, losses = [], []
    for row in run.eval_rows:
        done = [s for s in steps if s <= row["step"]]
        if done:
            flops.append(at_step[done[-1]])
            losses.append(float(row["val_loss"]))
    return np.asarray(flops), np.asarray(losses)


@register_run_metric("compute", "executed forward MFLOPs per token and training PFLOPs")
def compute_metrics(run: RunRecord) -> MetricValues:
    final = run.final_eval
    flops, _ = training_flops_curve(run)
    return {
        "mflops_per_token": final["flops_per_token"] / 1e6 if final.get("flops_per_token") else None,
        "train_pflops": float(flops[-1]) / 1e15 if len(flops) and flops[-1] > 0 else None,
    }


def loss_at_flops(run: RunRecord, budget: float) -> float | None:
    flops, losses = training_flops_curve(run)
    if not len(flops) or flops[-1] < budget or flops[-1] <= 0:
        return None
    return float(np.interp(budget, flops, losses))


def add_equal_flops(rows: list[dict[str, Any]], records: list[RunRecord]) -> float | None:
    """Set ``loss_at_equal_flops`` in every row; returns the common budget (FLOPs)."""
    totals = [training_flops_curve(r)[0] for r in records]
    finals = [float(t[-1]) for t in totals if len(t) and t[-1] > 0]
    budget = min(finals) if finals else None
    for row, record in zip(rows, records):
        row["loss_at_equal_flops"] = loss_at_flops(record, budget) if budget is not None else None
    return budget


def depth_mode_points(records: list[RunRecord]) -> list[tuple[str, float, float, bool]]:
    """(label, MFLOPs/token, loss, causal) of every depth mode evaluated in the runs."""
    points = []
    for run in records:
        for mode, row in run.final_eval.get("depth_modes", {}).items():
            points.append((f"{run.key}:{mode}", row["flops_per_token"] / 1e6, row["val_loss"], bool(row.get("causal"))))
    return points


def plot_quality_vs_compute(records: list[RunRecord], path: Path) -> Path | None:
    """Left: validation loss vs training FLOPs; right: final loss vs executed MFLOPs per token."""
    if not any(r.final_eval.get("flops_per_token") for r in records):
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    keys = list(dict.fromkeys(r.key for r in records))
    cmap = plt.get_cmap("tab10" if len(keys) <= 10 else "tab20")
    colour = {k: cmap(i % cmap.N) for i, k in enumerate(keys)}
    for run in records:
        flops, losses = training_flops_curve(run)
        left.plot(flops / 1e12, losses, color=colour[run.key], label=f"{run.key} s{run.seed}")
        right.scatter([run.final_eval["flops_per_token"] / 1e6], [run.final_eval["val_loss"]], color=colour[run.key],
                      s=40, label=run.key)
    for label, mflops, loss, causal in depth_mode_points(records):
        key = label.split(":")[0]
        right.scatter([mflops], [loss], facecolors="none" if causal else colour[key], edgecolors=colour[key],
                      marker="D", s=30)
        right.annotate(label.split(":", 1)[1], (mflops, loss), fontsize=7, xytext=(3, 3), textcoords="offset points")
    left.set(xlabel="training TFLOPs", ylabel="validation loss", title="Validation loss vs training compute")
    right.set(xlabel="executed forward MFLOPs per token", ylabel="validation loss",
              title="Final quality vs inference compute (diamonds: depth modes)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
