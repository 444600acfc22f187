"""Depth decisions as routing traces: each routed layer is a trace layer whose "experts"
are the method's options (e.g. 0 skip / 1 execute; 0 skip / 1 small / 2 big), one slot
per token, weight = the router weight applied (1 when the method applies none).

``DepthRoutingSource`` implements ``routelab.traces.recorder.RoutingSource``, so
``TraceRecorder`` and ``routelab trace`` write depth decisions in the standard trace
format; ``describe()`` goes into the trace metadata (key ``depth``) so that ``analyze``
knows the options, their compute cost and the model layer of every trace layer.
"""

from __future__ import annotations

from typing import Any

import torch

from routelab.core.errors import ConfigError
from routelab.traces.recorder import LayerRoutes

OPTION_COSTS = {"skip": 0.0, "execute": 1.0, "repeat": 2.0, "big": 1.0, "approximate": 0.0}


def option_costs(stack: Any, options: tuple[str, ...]) -> list[float]:
    """Compute of each option relative to running the block (or FFN) once."""
    costs = []
    for option in options:
        if option == "small":
            costs.append(stack.small_width / stack.d_ff)
        elif option.startswith("hops"):
            costs.append(float(option[4:]))
        else:
            costs.append(OPTION_COSTS[option])
    return costs


class DepthRoutingSource:
    """``RoutingSource`` of a depth-routed TinyLM (one trace layer per routed layer)."""

    def __init__(self, model: Any) -> None:
        if getattr(model, "depth", None) is None:
            raise ConfigError("DepthRoutingSource needs a TinyLM with a depth_router.")
        self.model = model
        probe = model(torch.zeros(1, 2, dtype=torch.long, device=model.embed.weight.device)).depth
        self.model_layers = [d.layer for d in probe.decisions]
        self.options = probe.decisions[0].options
        self.costs = option_costs(model.depth, self.options)

    @property
    def num_layers(self) -> int:
        return len(self.model_layers)

    @property
    def num_experts(self) -> int:
        return len(self.options)

    @property
    def layer_names(self) -> list[str]:
        return [f"blocks.{layer}" for layer in self.model_layers]

    def describe(self) -> dict[str, Any]:
        return {**self.model.depth.describe(), "mode": self.model.depth.mode, "options": list(self.options),
                "option_costs": self.costs, "model_layers": self.model_layers}

    @torch.no_grad()
    def route(self, input_ids_BS: torch.Tensor, padding_mask_BS: torch.Tensor | None) -> list[LayerRoutes]:
        out = self.model(input_ids_BS, padding_mask=padding_mask_BS) if padding_mask_BS is not None else self.model(input_ids_BS)
        real = padding_mask_BS.reshape(-1) if padding_mask_BS is not None else None
        routes = []
        for index, decision in enumerate(out.depth.decisions):
            choice = decision.choice_BS.reshape(-1)
            weight = decision.weight_BS.reshape(-1).float() if decision.weight_BS is not None else torch.ones_like(choice, dtype=torch.float32)
            if real is not None:
                choice, weight = choice[real], weight[real]
            routes.append(LayerRoutes(index, choice.unsqueeze(1), torch.where(choice >= 0, weight, 0.0).unsqueeze(1)))
        return routes
