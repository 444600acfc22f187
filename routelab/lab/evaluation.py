"""Validation of a TinyLM: loss, perplexity, per-domain loss, routing balance over the whole
validation set, and the routing of the fixed probe batch.

Balance over the validation set sums each layer's expert loads over all validation
batches before computing MaxVio / CV / dead experts (the global view; per-batch values are
logged during training). Routing fluctuation between two evaluations is the fraction of
(token, layer) pairs of the probe batch whose selected expert *set* changed
(the flip rate of Graph of Tokens, Nguyen et al. 2025, arXiv 2505.00792, for top-k).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from routelab.core.atomic_files import atomic_path
from routelab.core.routing_stats import balance_stats
from routelab.lab.batches import Batch
from routelab.lab.objective import PROBE_INDEX, evaluation_forward
from routelab.models.tinylm import TinyLM


def autocast(precision: str):
    """bf16 autocast for ``precision == 'bf16'``, else a no-op context."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def pad_slots(topk_idx_TK: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad ``[T, K]`` expert ids with ``-1`` to ``width`` slots."""
    missing = width - topk_idx_TK.shape[1]
    if missing <= 0:
        return topk_idx_TK
    return torch.cat([topk_idx_TK, topk_idx_TK.new_full((topk_idx_TK.shape[0], missing), -1)], dim=1)


def topk_set_changed(before_TK: torch.Tensor, after_TK: torch.Tensor) -> torch.Tensor:
    """bool ``[T]``: did each token's set of selected experts change (empty slots ignored)?"""
    width = max(before_TK.shape[1], after_TK.shape[1])
    before = pad_slots(before_TK, width).sort(dim=1).values
    after = pad_slots(after_TK, width).sort(dim=1).values
    return (before != after).any(dim=1)


def routing_fluctuation(before_LTK: Sequence[torch.Tensor], after_LTK: Sequence[torch.Tensor]) -> tuple[float, list[float]]:
    """Fraction of (token, layer) assignments whose top-k set changed: overall and per layer."""
    per_layer = [float(topk_set_changed(b, a).float().mean()) for b, a in zip(before_LTK, after_LTK)]
    overall = sum(per_layer) / len(per_layer) if per_layer else 0.0
    return overall, per_layer


@dataclass
class LayerTotals:
    """Running sums of one MoE layer's routing over the validation set."""

    load: torch.Tensor
    selected: float = 0.0
    kept: float = 0.0
    active_sum: float = 0.0
    tokens: float = 0.0

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        self.load += stats["load"].float().cpu()
        self.selected += float(stats["load_before_drop"].sum())
        self.kept += float(stats["load"].sum())
        self.active_sum += float(stats["active_experts_per_token"]) * float(stats["num_tokens"])
        self.tokens += float(stats["num_tokens"])

    def summary(self) -> dict[str, Any]:
        balance = {k: float(v) for k, v in balance_stats(self.load).items()}
        return {
            "load": self.load.tolist(),
            **balance,
            "drop_rate": (self.selected - self.kept) / self.selected if self.selected else 0.0,
            "active_experts_per_token": self.active_sum / self.tokens if self.tokens else 0.0,
        }


class RoutingCollector:
    """Keeps the routing of every validation batch (for ``val_routing.npz``)."""

    def __init__(self) -> None:
        self.token_ids: list[torch.Tensor] = []
        self.domains: list[torch.Tensor] = []
        self.topk_idx: list[list[torch.Tensor]] = []
        self.topk_weight: list[list[torch.Tensor]] = []
        self.num_experts = 0

    def add(self, batch: Batch, routings: Sequence[Any]) -> None:
        self.token_ids.append(batch.inputs)
        self.domains.append(batch.domains)
        self.topk_idx.append([r.topk_idx.detach().cpu() for r in routings])
        self.topk_weight.append([r.topk_weight.detach().float().cpu() for r in routings])
        self.num_experts = routings[0].num_experts if routings else 0

    def save(self, path: Path, moe_layers: Sequence[int]) -> None:
        """``val_routing.npz``: ``token_ids`` (the routed input tokens) and ``domains`` (of the
        predicted tokens) ``[sequences, seq]``, ``topk_idx``/``topk_weight``
        ``[layers, tokens, slots]`` in (sequence, position) order, ``num_experts``, ``moe_layers``."""
        arrays: dict[str, np.ndarray] = {
            "token_ids": torch.cat(self.token_ids).numpy(),
            "domains": torch.cat(self.domains).numpy(),
            "moe_layers": np.asarray(list(moe_layers), dtype=np.int64),
            "num_experts": np.asarray(self.num_experts, dtype=np.int64),
        }
        layers = len(self.topk_idx[0]) if self.topk_idx else 0
        if layers:
            width = max(t.shape[1] for per_batch in self.topk_idx for t in per_batch)
            arrays["topk_idx"] = torch.stack([
                torch.cat([pad_slots(per_batch[layer], width) for per_batch in self.topk_idx]) for layer in range(layers)
            ]).numpy().astype(np.int16)
            arrays["topk_weight"] = torch.stack([
                torch.cat([torch.nn.functional.pad(per_batch[layer], (0, width - per_batch[layer].shape[1]))
                           for per_batch in self.topk_weight]) for layer in range(layers)
            ]).numpy()
        with atomic_path(path) as tmp:
            np.savez_compressed(tmp, **arrays)


@torch.no_grad()
def evaluate(
    model: TinyLM,
    batches: Sequence[Batch],
    probe: Batch,
    domains: Sequence[str],
    precision: str,
    collector: RoutingCollector | None = None,
) -> tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]:
    """Validation metrics, and the probe batch's ``topk_idx`` / ``topk_weight`` per MoE layer.

    With a ``collector``, the routing of every validation batch is also kept there.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros(len(domains), dtype=torch.float64)
    count = torch.zeros(len(domains), dtype=torch.float64)
    layers: list[LayerTotals] = []
    flops_sum = 0.0
    depth_rates: dict[str, dict[str, float]] = {}
    try:
        for index, batch in enumerate(batches):
            with autocast(precision):
                out, token_loss = evaluation_forward(model, batch, index)
            token_loss = token_loss.double()
            labels = batch.domains.flatten()
            flops_sum += float(out.flops_per_token) * token_loss.numel()
            if out.depth is not None:
                for decision in out.depth.decisions:
                    rates = depth_rates.setdefault(str(decision.layer), {})
                    for option, rate in decision.rates().items():
                        rates[option] = rates.get(option, 0.0) + rate * token_loss.numel()
            loss_sum.index_add_(0, labels, token_loss)
            count.index_add_(0, labels, torch.ones_like(token_loss))
            if not layers:
                layers = [LayerTotals(torch.zeros(r.num_experts)) for r in out.routings]
            for totals, routing in zip(layers, out.routings):
                totals.add(routing.stats)
            if collector is not None and out.depth is None:
                collector.add(batch, out.routings)
        with autocast(precision):
            probe_out, _ = evaluation_forward(model, probe, PROBE_INDEX)
    finally:
        model.train(was_training)
    val_loss = float(loss_sum.sum() / count.sum())
    metrics: dict[str, Any] = {
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 700.0)),
        "val_tokens": int(count.sum()),
        "val_loss_by_domain": {d: float(loss_sum[i] / count[i]) for i, d in enumerate(domains) if count[i] > 0},
        "flops_per_token": flops_sum / max(float(count.sum()), 1.0),
    }
    if depth_rates:
        total = float(count.sum())
        metrics["depth_rates"] = {layer: {o: v / total for o, v in r.items()} for layer, r in depth_rates.items()}
    if layers:
        per_layer = [t.summary() for t in layers]
        for key in ("max_vio", "cv", "entropy", "dead_experts", "drop_rate", "active_experts_per_token"):
            metrics[key] = [layer[key] for layer in per_layer]
        metrics["load"] = [layer["load"] for layer in per_layer]
    probe_idx = [r.topk_idx.detach().cpu() for r in probe_out.routings]
    probe_weight = [r.topk_weight.detach().float().cpu() for r in probe_out.routings]
    return metrics, probe_idx, probe_weight
