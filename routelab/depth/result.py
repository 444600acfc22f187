"""What a depth-routed forward decided and what it executed.

Every depth method reports, per routed layer, one ``LayerDecision``: the option each token
took (``choice_BS`` indexes ``options``, ``-1`` at padding) and, where the method has one,
the router weight applied to the executed output. Routers built from routelab's router
parts also return their ``Routing`` (the same object MoE layers return), so balance and
selection statistics read the same way at every routing level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from routelab.core.routing import Routing
from routelab.depth.flops import FlopCounter


@dataclass
class LayerDecision:
    """The per-token decision of one layer.

    Attributes:
        layer: block index.
        options: names of the choices, e.g. ``("skip", "execute")``.
        choice_BS: int64 ``[batch, seq]`` index into ``options`` (-1 at padding).
        weight_BS: fp32 ``[batch, seq]`` weight applied to the executed output (None when
            the method applies none).
    """

    layer: int
    options: tuple[str, ...]
    choice_BS: torch.Tensor
    weight_BS: torch.Tensor | None = None

    def rates(self, padding_mask_BS: torch.Tensor | None = None) -> dict[str, float]:
        """Share of real tokens that took each option."""
        valid = self.choice_BS >= 0 if padding_mask_BS is None else padding_mask_BS & (self.choice_BS >= 0)
        total = max(int(valid.sum()), 1)
        return {name: int(((self.choice_BS == i) & valid).sum()) / total for i, name in enumerate(self.options)}


@dataclass
class DepthResult:
    """What ``DepthStack.forward`` returns besides the hidden states.

    Attributes:
        decisions: one ``LayerDecision`` per routed layer, in layer order.
        routings: the ``Routing`` of every depth router built from router parts.
        moe_routings: the ``Routing`` of every MoE FFN that ran (layer order).
        losses: unweighted named auxiliary losses (e.g. ``mod_bce_3``).
        aux_loss: their coefficient-weighted sum (added to the LM loss).
        flops: the FLOPs actually executed by the block stack in this forward.
        extras: method-specific scalars (e.g. the causal-predictor mismatch).
    """

    decisions: list[LayerDecision] = field(default_factory=list)
    routings: list[Routing] = field(default_factory=list)
    moe_routings: list[Routing] = field(default_factory=list)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_loss: torch.Tensor | None = None
    flops: FlopCounter = field(default_factory=FlopCounter)
    extras: dict[str, float] = field(default_factory=dict)

    def add_loss(self, name: str, value: torch.Tensor, coef: float) -> None:
        self.losses[name] = value
        weighted = coef * value.float()
        self.aux_loss = weighted if self.aux_loss is None else self.aux_loss + weighted

    def execution_rates(self) -> dict[int, dict[str, float]]:
        """``{layer: {option: share of tokens}}``."""
        return {d.layer: d.rates() for d in self.decisions}
