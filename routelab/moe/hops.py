"""Multi-hop application of one MoE layer with zero-shot relative-norm halting.

"Equifinality in Mixture-of-Experts Routing" (arXiv 2604.14419) applies the same MoE block
``H`` times, re-routing at every hop: ``h_{j+1} = h_j + MoE(h_j)``. At inference a token can
stop early: after hop ``j`` it halts when ``||h_{j+1} - h_j|| / ||h_j|| < theta``
(no training involved; the paper reports 25% fewer MoE FLOPs at +0.12% perplexity, theta
not given, so sweep it). ``theta = 0`` never halts (identical to plain multi-hop);
``theta = inf`` halts every token after exactly one hop.

Halted tokens are passed to the layer as padding, so they are neither routed nor computed
in later hops (the FLOP saving is real). With routers that compare tokens (expert
choice, Sinkhorn in training) the remaining tokens' routing depends on which tokens are
still active.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from routelab.core.errors import ConfigError
from routelab.core.routing import Routing
from routelab.core.validation import check_positive_int


@dataclass
class HopsOutput:
    """Result of ``apply_hops``.

    Attributes:
        h: the hidden states after the hops (``x`` plus every hop's MoE output).
        hops_per_token: int64 ``[batch, seq]`` hops applied to each token (0 for padding).
        token_hops: total MoE token-hops computed (sum of ``hops_per_token``).
        aux_loss: sum of the hops' auxiliary losses.
        routings: the ``Routing`` of every hop that ran.
    """

    h: torch.Tensor
    hops_per_token: torch.Tensor
    token_hops: int
    aux_loss: torch.Tensor
    routings: list[Routing] = field(default_factory=list)

    def flop_fraction(self, hops: int) -> float:
        """MoE compute used relative to running every real token through all ``hops``."""
        real = int((self.hops_per_token > 0).sum())
        return self.token_hops / max(real * hops, 1)


def apply_hops(
    layer: torch.nn.Module,
    x: torch.Tensor,
    *,
    hops: int,
    halt_threshold: float | None = None,
    padding_mask: torch.Tensor | None = None,
    **layer_kwargs: Any,
) -> HopsOutput:
    """Apply ``layer`` (an ``routelab.MoE``) ``hops`` times, ``h <- h + layer(h).y``.

    Args:
        layer: the MoE layer (its forward takes ``padding_mask``).
        x: ``[batch, seq, d_model]``.
        hops: ``H`` >= 1.
        halt_threshold: ``theta`` >= 0; a token halts after the hop whose relative update
            ``||delta|| / ||h||`` is below it. None disables halting.
        padding_mask: ``[batch, seq]`` bool, True = real token.
        **layer_kwargs: passed to every layer call (``token_ids``, ``timestep``, ...).
    """
    hops = check_positive_int("hops", hops)
    if halt_threshold is not None:
        halt_threshold = float(halt_threshold)
        if math.isnan(halt_threshold) or halt_threshold < 0:
            raise ConfigError(f"halt_threshold must be >= 0 (or None for no halting), got {halt_threshold}.")
    if "context" in layer_kwargs:
        raise ConfigError("apply_hops manages the padding mask itself; pass token_ids/timestep, not context.")
    batch, seq = x.shape[0], x.shape[1]
    active = torch.ones(batch, seq, dtype=torch.bool, device=x.device) if padding_mask is None else padding_mask.clone()
    hops_per_token = torch.zeros(batch, seq, dtype=torch.long, device=x.device)
    aux_loss = x.new_zeros((), dtype=torch.float32)
    routings: list[Routing] = []
    h = x
    for _ in range(hops):
        if not bool(active.any()):
            break
        out = layer(h, padding_mask=active if padding_mask is not None or not bool(active.all()) else None, **layer_kwargs)
        delta = out.y
        hops_per_token += active.long()
        aux_loss = aux_loss + out.aux_loss
        routings.append(out.routing)
        if halt_threshold is not None:
            with torch.no_grad():
                ratio = delta.float().norm(dim=-1) / h.float().norm(dim=-1).clamp_min(1e-30)
                active = active & ~(ratio < halt_threshold)
        h = h + delta
    return HopsOutput(h=h, hops_per_token=hops_per_token, token_hops=int(hops_per_token.sum()), aux_loss=aux_loss, routings=routings)
