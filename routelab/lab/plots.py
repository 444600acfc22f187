"""Figures of a comparison (matplotlib, Agg backend, PNG files).

* ``val_loss.png``: validation loss against training tokens, one colour per router (thin
  lines: seeds, thick: mean over seeds);
* ``max_vio.png``: per-batch MaxVio during training (mean over MoE layers, moving average);
* ``fluctuation.png``: routing fluctuation of the probe batch between evaluations;
* ``expert_load.png``: per-layer expert-load heatmaps on the validation set at the end
  (share of the layer's assignments per expert; first seed of each router).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from routelab.lab.run_metrics import RunRecord  # noqa: E402


def by_router(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    groups: dict[str, list[RunRecord]] = defaultdict(list)
    for record in records:
        groups[record.key].append(record)
    return dict(groups)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or values.size < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def colours(keys: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(keys) <= 10 else "tab20")
    return {key: cmap(i % cmap.N) for i, key in enumerate(keys)}


def save_line_plot(fig: plt.Figure, ax: plt.Axes, path: Path, *, xlabel: str, ylabel: str, title: str) -> Path:
    """Label, grid and legend ``ax``, write ``fig`` to ``path`` and close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_val_loss(records: list[RunRecord], path: Path) -> Path:
    groups = by_router(records)
    palette = colours(list(groups))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, runs in groups.items():
        curves = []
        for run in runs:
            rows = run.eval_rows
            x = np.array([r["tokens"] for r in rows], dtype=float)
            y = np.array([r["val_loss"] for r in rows], dtype=float)
            curves.append((x, y))
            if len(runs) > 1:
                ax.plot(x, y, color=palette[key], alpha=0.3, linewidth=0.8)
        length = min(len(y) for _, y in curves)
        mean = np.mean([y[:length] for _, y in curves], axis=0)
        ax.plot(curves[0][0][:length], mean, color=palette[key], linewidth=2, label=key)
    return save_line_plot(
        fig, ax, path, xlabel="training tokens", ylabel="validation loss (nats/token)", title="Validation loss"
    )


def plot_max_vio(records: list[RunRecord], path: Path) -> Path | None:
    groups = {k: v for k, v in by_router(records).items() if any(r.get("max_vio") for r in v[0].train_rows)}
    if not groups:
        return None
    palette = colours(list(groups))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, runs in groups.items():
        series = []
        for run in runs:
            rows = [r for r in run.train_rows if r.get("max_vio")]
            series.append((np.array([r["step"] for r in rows]), np.array([np.mean(r["max_vio"]) for r in rows])))
        length = min(len(y) for _, y in series)
        mean = np.mean([y[:length] for _, y in series], axis=0)
        window = max(1, length // 50)
        smooth = moving_average(mean, window)
        ax.plot(series[0][0][:length][window - 1 :] if window > 1 else series[0][0][:length], smooth,
                color=palette[key], label=key)
    ax.set_yscale("symlog", linthresh=0.1)
    return save_line_plot(
        fig, ax, path, xlabel="optimizer step", ylabel="MaxVio per batch (mean over layers)",
        title="Load imbalance during training",
    )


def plot_fluctuation(records: list[RunRecord], path: Path) -> Path | None:
    groups = by_router(records)
    palette = colours(list(groups))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for key, runs in groups.items():
        rows = [r for r in runs[0].eval_rows if r.get("routing_fluctuation") is not None and r.get("max_vio")]
        if rows:
            ax.plot([r["step"] for r in rows], [r["routing_fluctuation"] for r in rows], marker="o",
                    color=palette[key], label=key)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    return save_line_plot(
        fig, ax, path, xlabel="optimizer step", ylabel="share of (token, layer) expert sets changed",
        title="Routing fluctuation on the probe batch (since the previous evaluation)",
    )


def plot_expert_load(records: list[RunRecord], path: Path) -> Path | None:
    panels = [(key, runs[0]) for key, runs in by_router(records).items() if runs[0].final_eval.get("load")]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 3.2), squeeze=False)
    image = None
    vmax = max(
        (np.asarray(run.final_eval["load"]) / np.maximum(np.asarray(run.final_eval["load"]).sum(1, keepdims=True), 1)).max()
        for _, run in panels
    )
    for ax, (key, run) in zip(axes[0], panels):
        load = np.asarray(run.final_eval["load"], dtype=float)
        share = load / np.maximum(load.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_yticks(range(share.shape[0]))
        ax.set_yticklabels([str(layer) for layer in run.moe_layers or range(share.shape[0])])
    axes[0][0].set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="share of assignments")
    fig.suptitle("Expert load on the validation set (final)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_all(records: list[RunRecord], folder: Path) -> dict[str, Path]:
    """Draw every figure into ``folder``; returns ``{name: path}`` of the ones drawn."""
    drawn = {
        "val_loss": plot_val_loss(records, folder / "val_loss.png"),
        "max_vio": plot_max_vio(records, folder / "max_vio.png"),
        "fluctuation": plot_fluctuation(records, folder / "fluctuation.png"),
        "expert_load": plot_expert_load(records, folder / "expert_load.png"),
    }
    return {k: v for k, v in drawn.items() if v is not None}
