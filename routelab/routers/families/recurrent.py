"""The layerwise recurrent router RMoE (Qiu et al. 2024).

Layerwise recurrent routing, RMoE (Qiu et al. 2024, "Layerwise Recurrent Router for
Mixture-of-Experts", arXiv 2408.06793; code ``qiuzh20/RMoE``, ``llama_moe_rnn``).

Per MoE layer ``l``: ``x~ = W1_l x`` (``W1_l``: ``[r, D]``), ``h_l = cell(x~, h_{l-1})``
with ``h_0 = 0`` at the first MoE layer, logits ``z = W2_l h_l`` (``W2_l``: ``[E, r]``).
The cell (a GRU, or a tanh RNN for the ``rnn`` variant) is **one module shared by the
routers of all layers**; the projections are per layer. ``h`` is per token and lives
only within one forward pass (recurrence over depth, tokens in parallel); by default it
is not detached, so the router of layer ``l`` also learns from the layers after it.

How the state travels: the model creates one ``RoutingContext`` per forward and passes it
to every MoE layer (``context=``); layer ``l`` writes ``carry[carry_key] = (l, h_l)``
and layer ``l + 1`` reads it. A router built for layer 0 always starts from ``h = 0``
(so a context reused across forwards is safe); a router of layer ``l > 0`` refuses to run
without the state of layer ``l - 1`` of the same forward.

Build the routers of a whole model with ``build_recurrent_routers`` (one shared cell),
or share a cell yourself with ``create_router("rmoe", rnn_cell=cell, layer_index=l)``.
The shared cell appears under every layer in ``state_dict`` (same tensors), and loading
restores all of them; ``parameters()`` lists it once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from routelab.core.errors import ConfigError, InputError
from routelab.core.validation import check_choice, check_positive_int
from routelab.routers.parts.assembly import assemble_router, softmax_gate_mode
from routelab.routers.parts.router import Router, RoutingDraft, Scorer
from routelab.routers.registry import CommonOptions, RouterSpec, create_router, register_preset

CELL_TYPES = ("gru", "rnn")


def make_cell(cell_type: str, hidden_size: int) -> nn.Module:
    """A recurrence cell over ``hidden_size`` features: ``nn.GRUCell`` or a tanh ``nn.RNNCell``."""
    check_choice("cell_type", cell_type, CELL_TYPES)
    hidden_size = check_positive_int("rnn_hidden_size", hidden_size)
    if cell_type == "gru":
        return nn.GRUCell(hidden_size, hidden_size)
    return nn.RNNCell(hidden_size, hidden_size, nonlinearity="tanh")


class RecurrentScorer(Scorer):
    """``z = W2 cell(W1 x, h_prev)`` with the state carried in ``RoutingContext.carry``.

    Args:
        d_model, num_experts: shapes.
        cell: the (shared) ``nn.GRUCell``/``nn.RNNCell``; its size is ``r``.
        layer_index: this router's MoE layer (0 = first, starts from ``h = 0``).
        carry_key: key of the state in ``RoutingContext.carry``.
        detach_state: detach ``h`` before handing it to the next layer.
        init_std: std of ``W2`` (``W1`` uses the default ``nn.Linear`` initialisation).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        cell: nn.Module,
        *,
        layer_index: int,
        carry_key: str,
        detach_state: bool,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if not isinstance(cell, (nn.GRUCell, nn.RNNCell)):
            raise ConfigError(f"rnn_cell must be an nn.GRUCell or nn.RNNCell, got {type(cell).__name__}.")
        if cell.input_size != cell.hidden_size:
            raise ConfigError(
                f"rnn_cell must map r -> r features (input_size == hidden_size), got {cell.input_size} -> {cell.hidden_size}."
            )
        self.hidden_size = cell.hidden_size
        self.proj_in = nn.Linear(d_model, self.hidden_size, bias=False)
        self.cell = cell
        self.proj_out = nn.Linear(self.hidden_size, num_experts, bias=False)
        nn.init.normal_(self.proj_out.weight, std=init_std)
        self.layer_index = check_positive_int("layer_index", layer_index, minimum=0)
        if not isinstance(carry_key, str) or not carry_key:
            raise ConfigError(f"carry_key must be a non-empty string, got {carry_key!r}.")
        self.carry_key = carry_key
        self.detach_state = bool(detach_state)

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}, carry_key={self.carry_key!r}, detach_state={self.detach_state}"

    def previous_state(self, carry: dict[str, Any], num_tokens: int, like: torch.Tensor) -> torch.Tensor:
        if self.layer_index == 0:
            return like.new_zeros(num_tokens, self.hidden_size)
        entry = carry.get(self.carry_key)
        if entry is None or entry[0] != self.layer_index - 1:
            found = "nothing" if entry is None else f"the state of layer {entry[0]}"
            raise InputError(
                f"the recurrent router of MoE layer {self.layer_index} needs the routing state of layer "
                f"{self.layer_index - 1} from the same forward, but the context carries {found}. Create one "
                "RoutingContext per forward and pass it (context=...) to every MoE layer, in order."
            )
        h_prev = entry[1]
        if h_prev.shape != (num_tokens, self.hidden_size):
            raise InputError(
                f"the routing state from layer {self.layer_index - 1} covers {h_prev.shape[0]} tokens but layer "
                f"{self.layer_index} routes {num_tokens}; every MoE layer of one forward must see the same "
                "padding mask."
            )
        return h_prev.to(like.dtype)

    def forward(self, x_TD: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        x_tilde_TF = self.proj_in(x_TD)
        carry = draft.batch.context.carry
        h_prev_TF = self.previous_state(carry, x_TD.shape[0], x_tilde_TF)
        h_TF = self.cell(x_tilde_TF.float(), h_prev_TF.float())
        carry[self.carry_key] = (self.layer_index, h_TF.detach() if self.detach_state else h_TF)
        draft.extras["rmoe_state_TF"] = h_TF
        return self.proj_out(h_TF)


@register_preset(
    "rmoe",
    description="router state carried across layers by one shared GRU cell (RoutingContext.carry); "
    "softmax top-k renormalised, Switch loss 1e-3; build a model's routers with build_recurrent_routers",
    paper="Qiu et al. 2024, Layerwise Recurrent Router for Mixture-of-Experts (arXiv 2408.06793)",
    default_top_k=2,
    common_defaults={"aux_loss_coef": 1e-3},
)
def build_rmoe(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    rnn_hidden_size: int = 256,
    cell_type: str = "gru",
    rnn_cell: nn.Module | None = None,
    layer_index: int = 0,
    carry_key: str = "rmoe",
    detach_state: bool = False,
    normalization: str = "auto",
) -> Router:
    """RMoE: ``h_l = GRU(W1_l x, h_{l-1})``, ``z = W2_l h_l``; softmax -> top-k ->
    renormalise (Mixtral style); Switch loss 1e-3 (``router_aux_loss_coef`` of the code).

    ``rnn_cell`` is the cell shared by all layers (``rnn_hidden_size`` / ``cell_type`` build
    a new one when it is None); ``layer_index`` is this router's MoE layer (0 starts from
    ``h = 0``; ``l > 0`` reads layer ``l-1``'s state from the ``RoutingContext`` the model
    passes to every layer). ``detach_state`` cuts the gradient between layers (the paper
    does not). See ``build_recurrent_routers``.
    """
    cell = rnn_cell if rnn_cell is not None else make_cell(cell_type, rnn_hidden_size)
    scorer = RecurrentScorer(
        spec.d_model,
        spec.num_experts,
        cell,
        layer_index=layer_index,
        carry_key=carry_key,
        detach_state=detach_state,
        init_std=common.router_init_std,
    )
    return assemble_router(spec, common, scorer=scorer, gate_mode=softmax_gate_mode(normalization, spec.top_k))


def build_recurrent_routers(
    num_layers: int,
    *,
    d_model: int,
    num_experts: int,
    top_k: int | None = None,
    rnn_hidden_size: int = 256,
    cell_type: str = "gru",
    **options: Any,
) -> list[Router]:
    """The ``"rmoe"`` routers of a model's ``num_layers`` MoE layers, sharing one cell.

    Pass ``routers[l]`` to the ``l``-th MoE layer (``routelab.MoE(..., router=routers[l])``)
    and one ``RoutingContext`` per forward to all of them. ``options`` go to every router
    (e.g. ``aux_loss_coef``, ``detach_state``).
    """
    num_layers = check_positive_int("num_layers", num_layers)
    cell = make_cell(cell_type, rnn_hidden_size)
    return [
        create_router("rmoe", d_model=d_model, num_experts=num_experts, top_k=top_k, rnn_cell=cell, layer_index=layer, **options)
        for layer in range(num_layers)
    ]
