"""The layerwise recurrent router RMoE (Qiu et al. 2024; spec §10)."""

from __future__ import annotations

from typing import Any

from torch import nn

from routelab.core.validation import check_positive_int
from routelab.routers.base import Router
from routelab.routers.presets.common import assemble_router, softmax_gate_mode
from routelab.routers.recurrent import RecurrentScorer, make_cell
from routelab.routers.registry import CommonOptions, RouterSpec, create_router, register_preset


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
