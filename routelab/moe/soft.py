"""The Soft MoE layer (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts",
arXiv 2308.00951): experts process *slots*, soft combinations of a sequence's tokens.

``SoftMoE(..., router="soft-moe")`` takes the constructor arguments of ``routelab.MoE`` and
returns the same ``MoEOutput``; ``routelab.moe_layer`` builds a ``SoftMoE`` for a soft
router and an ``MoE`` for any other. Per sequence:

1. slot logits ``L = x Phi`` (``[S, E*p]``, from ``SoftRouter``);
2. dispatch ``D = softmax over the real tokens`` of each slot column; slot inputs
   ``x~ = D^T x`` (``[E*p, D]``);
3. expert ``e`` runs on its ``p`` slots (all sequences batched into one grouped GEMM);
4. combine ``C = softmax over slots`` of each token row; ``y = C f(x~)``.

Padding tokens get no dispatch weight and a zero output. ``MoEOutput.routing`` holds the
combine mass of every token on every expert (see ``routelab.routers.families.soft``).
Dispatch is non-causal within a sequence.
"""

from __future__ import annotations

from typing import Any

import torch

from routelab.core.context import RoutingContext, TokenBatch
from routelab.core.errors import ConfigError
from routelab.moe.layer import MoE, MoEOutput
from routelab.routers.parts.router import Router
from routelab.routers.registry import preset_info
from routelab.routers.parts.layout import to_padded
from routelab.routers.families.soft import SoftRouter, soft_dispatch_weights


class SoftMoE(MoE):
    """A Soft MoE layer. Arguments as ``routelab.MoE``; the router must be a soft one:
    ``"soft-moe"`` (options ``slots_per_expert``, ``normalize``) or a built ``SoftRouter``."""

    layer_kind = "soft"

    def __init__(self, **kwargs: Any) -> None:
        router = kwargs.get("router", "soft-moe")
        if router_layer_kind(router) != "soft":
            raise ConfigError(
                f"SoftMoE needs a soft router (router='soft-moe' or a SoftRouter), got {router!r}; "
                "routelab.MoE runs the others."
            )
        if kwargs.get("experts") is not None:
            raise ConfigError("SoftMoE builds its own experts; experts= is not supported.")
        kwargs["router"] = router
        super().__init__(**kwargs)

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        *,
        timestep: torch.Tensor | None = None,
        attention: torch.Tensor | None = None,
        context: RoutingContext | None = None,
    ) -> MoEOutput:
        """Run the Soft MoE layer on ``x`` (``[batch, seq, d_model]``); arguments as ``MoE.forward``.

        Soft MoE routing depends on neither a timestep nor an attention matrix, so both
        arguments are refused rather than ignored. A shared ``context`` may carry them: it is
        the whole model's, and each router reads only what it uses.
        """
        for name, value in (("timestep", timestep), ("attention", attention)):
            if value is not None:
                raise ConfigError(
                    f"SoftMoE got {name}=..., which Soft MoE routing does not use; pass no {name} to this layer "
                    f"(a timestep- or attention-dependent router runs in routelab.MoE)."
                )
        x_TD, batch = self.real_tokens(x, padding_mask, token_ids, context=context)
        assert isinstance(self.router, SoftRouter)
        soft = self.router.route_slots(x_TD, batch)
        y_TD = self.add_shared_experts(x_TD, self.soft_mixture(x_TD, soft.slot_logits_TN, batch))
        return MoEOutput(y=to_padded(y_TD, batch), routing=soft.routing, aux_loss=soft.routing.aux_loss)

    def soft_mixture(self, x_TD: torch.Tensor, slot_logits_TN: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """``y_t = sum_s C_ts f_{e(s)}(sum_u D_us x_u)`` within each sequence (real tokens only)."""
        dtype = x_TD.dtype
        num_slots = slot_logits_TN.shape[1]
        dispatch_BSN = soft_dispatch_weights(slot_logits_TN, batch).to(dtype)
        combine_BSN = to_padded(torch.softmax(slot_logits_TN, dim=-1).to(dtype), batch)
        slots_BND = torch.bmm(dispatch_BSN.transpose(1, 2), to_padded(x_TD, batch))
        # Slot s belongs to expert s // p: expert-major rows are [N, B] flattened.
        rows_ND = slots_BND.transpose(0, 1).reshape(num_slots * batch.batch_size, self.d_model)
        per_expert = self.router.slots_per_expert * batch.batch_size
        counts_E = torch.full((self.num_experts,), per_expert, dtype=torch.long, device=x_TD.device)
        out_ND = self.experts.forward_sorted(rows_ND, counts_E)
        out_BND = out_ND.view(num_slots, batch.batch_size, self.d_model).transpose(0, 1).to(dtype)
        y_BSD = torch.bmm(combine_BSN, out_BND)
        return y_BSD.reshape(-1, self.d_model).index_select(0, batch.flat_index_T)


def router_layer_kind(router: str | Router) -> str:
    """``"token"`` or ``"soft"``: the layer a preset name or a built router runs in."""
    if isinstance(router, str):
        return preset_info(router).layer_kind
    return getattr(router, "layer_kind", "token")


def moe_layer(**kwargs: Any) -> MoE:
    """The MoE layer for ``router``: a ``SoftMoE`` for a soft router, else a ``routelab.MoE``.

    Takes the keyword arguments of ``routelab.MoE`` (``router`` defaults to ``"mixtral"``).
    """
    layer = SoftMoE if router_layer_kind(kwargs.get("router", "mixtral")) == "soft" else MoE
    return layer(**kwargs)
