"""Mixture-of-Depths (Raposo et al. 2024, "Mixture-of-Depths: Dynamically allocating compute
in transformer-based language models", arXiv 2404.02258).

In every routed block a scalar router ``r_t = w . x_t`` scores the tokens and only the
top ``C = capacity * S`` tokens of each sequence run the block (attention among
themselves and the FFN); their output is ``x_t + r_t * (block(x_t) - x_t)`` (the router
weight multiplies the block output, which is how the router gets a gradient), every other
token passes on the residual unchanged. The top-C choice is expert-choice routing over a
single "execute" expert with capacity factor ``capacity``: the router is
``create_router("expert-choice", num_experts=1, top_k=1, capacity_factor=capacity,
ec_gate="post-softmax")`` (ranked by the raw logit), so it returns the same ``Routing``
object and statistics as an MoE router. In the paper's best setting every other block is
routed (``every=2``) at capacity 12.5 %.

Top-C over the sequence is non-causal, so two causal predictors are trained alongside
(both from the paper): (a) ``causal-aux`` - an auxiliary binary cross-entropy on the
router logits with the top-C membership as targets (computed on a stop-gradient input, so
it trains only the router), decoding executes a token iff ``sigmoid(r) > 0.5``;
(b) ``causal-mlp`` - a small MLP on the stop-gradient input trained by BCE on the same
targets, decoding executes iff its logit > 0. ``extras`` reports how often each predictor
disagrees with top-C (the train/inference mismatch). Selected tokens keep their original
positions for the rotary embedding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from routelab.core.context import RoutingContext, TokenBatch
from routelab.core.errors import ConfigError
from routelab.depth.blocks import add_to_tokens, gather_tokens, run_recorded_block, selection_index, subset_context, subset_rope
from routelab.depth.result import DepthResult, LayerDecision
from routelab.depth.stack import DepthStack
from routelab.routers import create_router

MOD_WEIGHTS = ("logit", "sigmoid", "none")


def routed_layers(n_layers: int, every: int, layers: list[int] | None = None) -> list[int]:
    """Layers with a depth router: ``layers`` if given, else ``every-1, 2*every-1, ...``
    (``every=2``: every other block, the first one always full)."""
    if layers is not None:
        bad = [l for l in layers if not 0 <= int(l) < n_layers]
        if bad:
            raise ConfigError(f"layers {bad} are outside 0..{n_layers - 1}.")
        return sorted({int(l) for l in layers})
    if every < 1 or every > n_layers:
        raise ConfigError(f"every={every} must be in 1..n_layers={n_layers} (1 routes every block).")
    return [i for i in range(n_layers) if i % every == every - 1]


def flat_tokens(x_BSD: torch.Tensor, padding_mask_BS: torch.Tensor | None, context: RoutingContext) -> tuple[torch.Tensor, TokenBatch]:
    """Real tokens ``[T, D]`` and their ``TokenBatch`` (for calling a router)."""
    batch, seq, d_model = x_BSD.shape
    tokens = TokenBatch.from_mask(batch, seq, padding_mask_BS, device=x_BSD.device, context=context)
    x_flat = x_BSD.reshape(batch * seq, d_model)
    return (x_flat.index_select(0, tokens.flat_index_T) if tokens.has_padding else x_flat), tokens


def to_grid(values_T: torch.Tensor, tokens: TokenBatch, fill: float | bool) -> torch.Tensor:
    """Per-token values back in the ``[batch, seq]`` layout, ``fill`` at padding."""
    out = values_T.new_full((tokens.batch_size * tokens.seq_len,), fill)
    return out.index_copy(0, tokens.flat_index_T, values_T).view(tokens.batch_size, tokens.seq_len)


class CausalPredictor(nn.Module):
    """The small MLP that predicts top-C membership from a stop-gradient input."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.net(x_TD.detach().float()).squeeze(-1)


def apply_routed_block(
    block: nn.Module,
    x_BSD: torch.Tensor,
    selected_BS: torch.Tensor,
    weight_BS: torch.Tensor | None,
    cos_Sd: torch.Tensor,
    sin_Sd: torch.Tensor,
    context: RoutingContext,
    result: DepthResult,
    activation: str,
) -> torch.Tensor:
    """Run ``block`` on the selected tokens only; ``x + w * (block(x) - x)`` there, ``x`` elsewhere."""
    idx_BN, valid_BN = selection_index(selected_BS)
    if idx_BN.shape[1] == 0:
        return x_BSD
    x_sel = gather_tokens(x_BSD, idx_BN)
    cos, sin = subset_rope(cos_Sd, sin_Sd, idx_BN)
    y_sel = run_recorded_block(block, x_sel, cos, sin, valid_BN, subset_context(context, idx_BN, valid_BN), result,
                               activation)
    delta = y_sel - x_sel
    if weight_BS is not None:
        delta = delta * weight_BS.gather(1, idx_BN).unsqueeze(-1).to(delta.dtype)
    return add_to_tokens(x_BSD, idx_BN, valid_BN, delta)


class MoDStack(DepthStack):
    """Mixture-of-Depths over a TinyLM block stack (see the module docstring).

    Args:
        d_model, n_layers: the model's shape.
        capacity: share of each sequence's tokens a routed block processes (0 < c <= 1).
        every: route every ``every``-th block (2 = every other one); ``layers`` overrides.
        weight: ``logit`` (paper: raw router output), ``sigmoid``, or ``none`` (weight 1).
        aux_coef: weight of the auxiliary BCE on the router logits (method a).
        predictor_coef: weight of the MLP predictor's BCE (method b; it trains only the MLP).
        predictor_hidden: hidden width of that MLP (default ``d_model // 2``).
        eval_mode: ``causal-aux`` (default), ``causal-mlp`` or ``topk``.
    """

    name = "mod"
    modes = ("topk", "causal-aux", "causal-mlp")
    causal_modes = ("causal-aux", "causal-mlp")

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        *,
        capacity: float = 0.125,
        every: int = 2,
        layers: list[int] | None = None,
        weight: str = "logit",
        aux_coef: float = 0.01,
        predictor_coef: float = 0.01,
        predictor_hidden: int | None = None,
        router_init_std: float = 0.02,
        train_mode: str = "topk",
        eval_mode: str = "causal-aux",
        activation: str = "swiglu",
    ) -> None:
        super().__init__(train_mode=train_mode, eval_mode=eval_mode, activation=activation)
        if not 0 < float(capacity) <= 1:
            raise ConfigError(f"capacity must be in (0, 1] (share of tokens per sequence), got {capacity}.")
        if weight not in MOD_WEIGHTS:
            raise ConfigError(f"weight must be one of {list(MOD_WEIGHTS)}, got {weight!r}.")
        self.capacity, self.weight, self.d_model = float(capacity), weight, d_model
        self.aux_coef, self.predictor_coef = float(aux_coef), float(predictor_coef)
        self.layers = routed_layers(n_layers, every, layers)
        self.routers = nn.ModuleDict({
            str(l): create_router("expert-choice", d_model=d_model, num_experts=1, top_k=1, capacity_factor=self.capacity,
                                  ec_gate="post-softmax", router_init_std=router_init_std)
            for l in self.layers
        })
        hidden = predictor_hidden or max(d_model // 2, 1)
        self.predictors = nn.ModuleDict({str(l): CausalPredictor(d_model, hidden) for l in self.layers})
        self.predictor_hidden = hidden
        self.measure_mismatch = False  # also compute the train/inference mismatch in evaluation

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "capacity": self.capacity, "layers": self.layers, "weight": self.weight}

    def router_weight(self, logits_T: torch.Tensor) -> torch.Tensor | None:
        if self.weight == "none":
            return None
        return torch.sigmoid(logits_T) if self.weight == "sigmoid" else logits_T

    def decide(self, layer: int, x_BSD: torch.Tensor, padding_mask_BS: torch.Tensor | None, context: RoutingContext,
               result: DepthResult) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(selected_BS, weight_BS)`` of one routed layer; records losses, stats and mismatch."""
        router, predictor = self.routers[str(layer)], self.predictors[str(layer)]
        x_TD, tokens = flat_tokens(x_BSD, padding_mask_BS, context)
        n = tokens.num_tokens
        routing = router(x_TD, tokens)
        logits_T = routing.logits[:, 0]
        topk_T = routing.topk_idx[:, 0] >= 0
        result.flops.linear(self.d_model, 1, n, part="depth_router")
        mode = self.mode
        need_mlp = self.training or self.measure_mismatch or mode == "causal-mlp"
        mlp_logits_T = predictor(x_TD) if need_mlp else None
        if need_mlp:
            result.flops.linear(self.d_model, self.predictor_hidden, n, part="depth_router")
            result.flops.linear(self.predictor_hidden, 1, n, part="depth_router")
        if self.training and n:
            target_T = topk_T.float()
            # method (a): BCE on the router's logits from a stop-gradient input (trains only the router)
            aux_logits_T = F.linear(x_TD.detach().float(), router.scorer.weight).squeeze(-1)
            result.flops.linear(self.d_model, 1, n, part="depth_router")
            result.add_loss(f"mod_bce_{layer}", F.binary_cross_entropy_with_logits(aux_logits_T, target_T), self.aux_coef)
            result.add_loss(f"mod_predictor_{layer}", F.binary_cross_entropy_with_logits(mlp_logits_T, target_T),
                            self.predictor_coef)
        if (self.training or self.measure_mismatch) and n:
            with torch.no_grad():
                result.extras[f"mismatch_aux_{layer}"] = float(((logits_T > 0) != topk_T).sum()) / n
                result.extras[f"mismatch_mlp_{layer}"] = float(((mlp_logits_T > 0) != topk_T).sum()) / n
        if mode == "topk":
            selected_T = topk_T
        elif mode == "causal-aux":
            selected_T = logits_T > 0
        else:
            selected_T = mlp_logits_T > 0
        weight_T = self.router_weight(logits_T)
        gate_T = weight_T if weight_T is not None else torch.ones_like(logits_T)
        result.routings.append(dataclasses.replace(
            routing,
            topk_idx=torch.where(selected_T, 0, -1).unsqueeze(1),
            topk_weight=torch.where(selected_T, gate_T, torch.zeros_like(gate_T)).unsqueeze(1),
        ))
        selected_BS = to_grid(selected_T, tokens, False)
        weight_BS = to_grid(weight_T, tokens, 0.0) if weight_T is not None else None
        choice_BS = to_grid(selected_T.long(), tokens, -1)
        result.decisions.append(LayerDecision(layer, ("skip", "execute"), choice_BS, weight_BS))
        return selected_BS, weight_BS

    def forward(self, blocks, x_BSD, cos_Sd, sin_Sd, attn_mask_BSS, padding_mask_BS, context):
        result = DepthResult()
        for index, block in enumerate(blocks):
            if index not in self.layers:
                x_BSD = run_recorded_block(block, x_BSD, cos_Sd, sin_Sd, padding_mask_BS, context, result,
                                           self.activation, attn_mask_BSS)
                continue
            selected_BS, weight_BS = self.decide(index, x_BSD, padding_mask_BS, context, result)
            x_BSD = apply_routed_block(block, x_BSD, selected_BS, weight_BS, cos_Sd, sin_Sd, context, result,
                                       self.activation)
        return x_BSD, result
