"""What an attached handle sees of each router call, and the per-layer load it accumulates.

A ``RouterCall`` is the routing of the real tokens of one MoE layer in one model
forward, in (batch, position) order, whether the router is the model's own or a
routelab replacement. Observers (the trace recorder, the load counter, RoMA, the
rerouting layer selector) receive every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from routelab.core.routing_stats import balance_stats, expert_load
from routelab.models.hf.context import ForwardTokens


@dataclass
class RouterCall:
    """One MoE layer's routing of the real tokens of one forward.

    Attributes:
        layer: index of the MoE layer among the model's MoE layers (0-based).
        model_layer: index of the decoder layer that holds it.
        logits_TE: router logits (with grad when the forward has grad).
        topk_idx_TK: int64 expert ids, ``-1`` in empty slots.
        topk_weight_TK: gate weights (with grad), 0 in empty slots.
        tokens: the layout of the forward (token ids, sequence ids, positions).
    """

    layer: int
    model_layer: int
    logits_TE: torch.Tensor
    topk_idx_TK: torch.Tensor
    topk_weight_TK: torch.Tensor
    tokens: ForwardTokens


class RouterObserver(Protocol):
    """Receives every ``RouterCall`` of an attached model."""

    def on_router_call(self, call: RouterCall) -> None: ...


class LoadCounter:
    """Accumulates the expert load of every MoE layer (the model's own routing, or a replacement's)."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_experts = num_experts
        self.load_LE = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.tokens_L = torch.zeros(num_layers, dtype=torch.float64)

    def on_router_call(self, call: RouterCall) -> None:
        load_E = expert_load(call.topk_idx_TK.detach(), self.num_experts).to("cpu", torch.float64)
        self.load_LE[call.layer] += load_E
        self.tokens_L[call.layer] += call.topk_idx_TK.shape[0]

    def reset(self) -> None:
        self.load_LE.zero_()
        self.tokens_L.zero_()

    def stats(self) -> dict[str, dict[str, float | list[float]]]:
        """Per layer (``"layer_<i>"``) and over all layers (``"all"``): load, MaxVio, CV,
        normalised entropy, dead experts and tokens seen (``routelab.core.routing_stats``)."""
        out: dict[str, dict[str, float | list[float]]] = {}
        for layer in range(self.load_LE.shape[0]):
            out[f"layer_{layer}"] = _summary(self.load_LE[layer], float(self.tokens_L[layer]))
        out["all"] = _summary(self.load_LE.sum(dim=0), float(self.tokens_L.sum()))
        return out


def _summary(load_E: torch.Tensor, num_tokens: float) -> dict[str, float | list[float]]:
    stats: dict[str, float | list[float]] = {k: float(v) for k, v in balance_stats(load_E.float()).items()}
    stats["load"] = load_E.tolist()
    stats["num_tokens"] = num_tokens
    return stats
