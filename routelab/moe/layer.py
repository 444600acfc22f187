"""The MoE layer: router -> ``Routing`` -> dropless (or capacity-limited) dispatch -> combine.

Padding tokens are removed before routing, so they are never routed, never dropped and
never counted in losses or statistics; their output rows are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from routelab.core.context import RoutingContext, TokenBatch
from routelab.core.errors import ConfigError
from routelab.core.routing import Routing
from routelab.core.validation import check_activations, check_positive_int, check_token_tensor, inputs_checked_by_layer
from routelab.moe.dispatch import dispatch_combine
from routelab.moe.experts import BatchedExperts, DenseFFN
from routelab.routers.parts.router import Router
from routelab.routers.parts.expert_access import attach_experts
from routelab.routers.registry import create_router


LAYER_OF_KIND = {"token": "routelab.MoE", "soft": "routelab.SoftMoE"}


@dataclass
class MoEOutput:
    """What an MoE layer returns.

    Attributes:
        y: output of the shape of the input ``x``.
        routing: the ``Routing`` of the real tokens.
        aux_loss: coefficient-weighted sum of the router's losses (zero scalar if none).
    """

    y: torch.Tensor
    routing: Routing
    aux_loss: torch.Tensor


class MoE(nn.Module):
    """A mixture-of-experts FFN layer with a pluggable router.

    Args:
        d_model: model width ``D``.
        d_hidden: hidden width of each routed expert.
        num_experts: number of routed experts ``E``.
        top_k: experts per token (default: the preset's).
        router: a preset name from ``routelab.list_routers()`` or a built ``Router``.
        activation: ``swiglu`` or ``gelu``.
        num_shared_experts: always-on experts (DeepSeekMoE), fused into one dense FFN of
            width ``num_shared_experts * shared_d_hidden``, added with gate 1.
        shared_d_hidden: hidden width per shared expert (default ``d_hidden``).
        shared_expert_gate: scale the shared experts' output by a learned per-token
            ``sigmoid(w^T x)`` (Qwen2-MoE; the condenser experts of arXiv 2604.23036)
            instead of gate 1.
        dispatch: ``auto`` (grouped GEMM when available), ``grouped_mm`` or ``loop``.
        check_inputs: check ``x`` for NaN/Inf on every call (one cheap pass).
        experts: a prebuilt expert module with ``num_experts``, ``forward_sorted`` and
            ``gate_projection`` (e.g. a ``routelab.moe.ExpertPool`` shared with adjacent
            layers, as in ReXMoE); ``activation`` and ``dispatch`` then do not apply.
        **router_options: options of the preset (e.g. ``capacity_factor``, ``z_loss_coef``).

    Router parts that read expert weights (ERC loss, MoE-X) get the experts through
    ``routelab.routers.parts.expert_access.attach_experts``, called here. A soft router
    (``"soft-moe"``, whose experts process mixtures of tokens) cannot run through discrete
    dispatch and is refused: use ``routelab.SoftMoE``, or ``routelab.moe_layer``, which
    picks the layer for any router.
    """

    layer_kind = "token"  # the routers' ``layer_kind`` this layer runs

    def __init__(
        self,
        *,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        top_k: int | None = None,
        router: str | Router = "mixtral",
        activation: str = "swiglu",
        num_shared_experts: int = 0,
        shared_d_hidden: int | None = None,
        shared_expert_gate: bool = False,
        dispatch: str = "auto",
        check_inputs: bool = True,
        experts: nn.Module | None = None,
        **router_options: Any,
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.d_hidden = check_positive_int("d_hidden", d_hidden)
        self.num_experts = check_positive_int("num_experts", num_experts)
        if isinstance(router, Router):
            if router_options:
                raise ConfigError(
                    f"router options {sorted(router_options)} were given with an already built Router; "
                    "pass a preset name instead, or build the router with those options."
                )
            if router.num_experts != num_experts:
                raise ConfigError(f"the router has {router.num_experts} experts but num_experts={num_experts}.")
            self.router = router
        elif isinstance(router, str):
            self.router = create_router(router, d_model=d_model, num_experts=num_experts, top_k=top_k, **router_options)
        else:
            raise ConfigError(f"router must be a preset name or a routelab Router, got {type(router).__name__}.")
        self.check_layer_kind()
        self.top_k = self.router.top_k
        if experts is None:
            self.experts = BatchedExperts(num_experts, d_model, d_hidden, activation, dispatch)
        elif getattr(experts, "num_experts", None) != num_experts or getattr(experts, "d_model", None) != d_model:
            raise ConfigError(
                f"experts= holds {getattr(experts, 'num_experts', '?')} experts of width {getattr(experts, 'd_model', '?')}; "
                f"the layer needs num_experts={num_experts}, d_model={d_model}."
            )
        else:
            self.experts = experts
        attach_experts(self.router, self.experts)
        self.num_shared_experts = check_positive_int("num_shared_experts", num_shared_experts, minimum=0)
        self.shared_experts = None
        if num_shared_experts:
            width = num_shared_experts * (shared_d_hidden or d_hidden)
            self.shared_experts = DenseFFN(d_model, width, activation)
        self.shared_gate = None
        if shared_expert_gate:
            if not num_shared_experts:
                raise ConfigError("shared_expert_gate=True needs num_shared_experts >= 1.")
            self.shared_gate = nn.Linear(d_model, 1, bias=False)
        self.check_inputs = check_inputs

    def check_layer_kind(self) -> None:
        if self.router.layer_kind != self.layer_kind:
            raise ConfigError(
                f"router {self.router.name!r} is a {self.router.layer_kind!r} router and runs in "
                f"{LAYER_OF_KIND.get(self.router.layer_kind, '?')}, not {LAYER_OF_KIND[self.layer_kind]}: build "
                "the layer with that class, or with routelab.moe_layer(...), which picks the layer for any router."
            )

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
        """Route and run ``x`` (``[batch, seq, d_model]``).

        Args:
            padding_mask: ``[batch, seq]`` bool, True = real token.
            token_ids: ``[batch, seq]`` int64 vocabulary ids (hash routers).
            timestep: ``[batch]`` per-sequence timestep / mask ratio (diffusion routers).
            attention: ``[batch, seq, seq]`` head-averaged attention (attention-aware routers).
            context: a ``RoutingContext`` shared by the model's MoE layers; the arguments
                above, when given, take precedence over its fields.
        """
        x_TD, batch = self.real_tokens(
            x, padding_mask, token_ids, timestep=timestep, attention=attention, context=context
        )
        with inputs_checked_by_layer():
            routing = self.router(x_TD, batch)
        y_TD = dispatch_combine(x_TD, routing.topk_idx, routing.topk_weight, self.experts)
        y_TD = self.add_shared_experts(x_TD, y_TD)
        return MoEOutput(y=self.padded_output(y_TD, batch), routing=routing, aux_loss=routing.aux_loss)

    def real_tokens(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None,
        token_ids: torch.Tensor | None,
        *,
        timestep: torch.Tensor | None = None,
        attention: torch.Tensor | None = None,
        context: RoutingContext | None = None,
    ) -> tuple[torch.Tensor, TokenBatch]:
        """Check the inputs of ``forward`` and flatten ``x`` to its real tokens ``[T, d_model]``,
        with the ``TokenBatch`` describing them (arguments as ``forward``)."""
        check_activations(x, self.d_model, finite=self.check_inputs)
        batch_size, seq_len, _ = x.shape
        check_token_tensor("padding_mask", padding_mask, batch_size, seq_len, dtype_kind="bool")
        check_token_tensor("token_ids", token_ids, batch_size, seq_len, dtype_kind="int")
        context = context if context is not None else RoutingContext()
        padding_mask = padding_mask if padding_mask is not None else context.padding_mask
        token_ids = token_ids if token_ids is not None else context.token_ids
        if timestep is not None or attention is not None:
            context = RoutingContext(
                token_ids=context.token_ids,
                padding_mask=context.padding_mask,
                timestep=timestep if timestep is not None else context.timestep,
                attention=attention if attention is not None else context.attention,
                carry=context.carry,
            )
        batch = TokenBatch.from_mask(
            batch_size, seq_len, padding_mask, device=x.device, token_ids=token_ids, context=context
        )
        x_flat = x.reshape(batch_size * seq_len, self.d_model)
        x_TD = x_flat.index_select(0, batch.flat_index_T) if batch.has_padding else x_flat
        return x_TD, batch

    def add_shared_experts(self, x_TD: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
        """``y_TD`` plus the (optionally sigmoid-gated) output of the shared experts, if any."""
        if self.shared_experts is None:
            return y_TD
        shared_TD = self.shared_experts(x_TD)
        if self.shared_gate is not None:
            shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
        return y_TD + shared_TD

    def padded_output(self, y_TD: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """Per-token outputs back in the ``[batch, seq, d_model]`` layout, zeros at padding."""
        y_flat = y_TD
        if batch.has_padding:
            y_flat = y_TD.new_zeros(batch.batch_size * batch.seq_len, self.d_model)
            y_flat = y_flat.index_copy(0, batch.flat_index_T, y_TD)
        return y_flat.view(batch.batch_size, batch.seq_len, self.d_model)
