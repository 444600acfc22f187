"""Duo-LLM (Apple, "Duo-LLM: A Framework for Studying Adaptive Computation in Large
Language Models", arXiv 2410.10846): every FFN layer holds a big FFN (the block's own),
a small FFN, and the option to skip the FFN; each token takes one of the three per layer.

Stage 1 trains the LM with random routing among the three options (``train_mode
"random"``) so that every path is trained. The oracle (``routelab.depth.oracle``) then
searches, for each token, the path of least loss under a budget of big layers; the token's
difficulty is loss(all-small) - loss(best path). Stage 2 trains per-layer 3-way routers
(``create_router("switch", num_experts=3, top_k=1)``: softmax over {skip, small, big},
top-1) as classifiers of the oracle's choice on the frozen LM (``fit_duo_routers``); at
inference a compute penalty (``penalty * cost``, cost 0/small/1 by FFN width) is
subtracted from the router logits [a reconstruction: the paper's penalty is not specified].

Attention always runs, so every mode is causal and a KV cache needs no change; only the
FFN of each token differs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from routelab.core.errors import ConfigError
from routelab.depth.blocks import attention_delta, ffn_width
from routelab.depth.mod import flat_tokens, to_grid
from routelab.depth.result import DepthResult, LayerDecision
from routelab.depth.stack import DepthStack
from routelab.moe.experts import DenseFFN
from routelab.routers import create_router

DUO_OPTIONS = ("skip", "small", "big")
SKIP, SMALL, BIG = 0, 1, 2


class DuoStack(DepthStack):
    """Small / big / skip FFN per token and layer (see the module docstring).

    Args:
        d_model, n_layers, d_ff: the model's shape (the big FFN is the block's, width d_ff).
        small_ratio: width of the small FFN as a share of ``d_ff`` (default 1/4).
        random_probs: option probabilities of random routing (skip, small, big).
        penalty: compute penalty subtracted from the router logits at inference.
        eval_mode: ``router`` (learned, default), ``random``, ``big``, ``small``, ``given``
            (per-token choices set with ``set_choices``, e.g. the oracle's).
    """

    name = "duo"
    modes = ("random", "router", "big", "small", "skip", "given")
    causal_modes = ("random", "router", "big", "small", "skip")

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        d_ff: int,
        *,
        small_ratio: float = 0.25,
        random_probs: tuple[float, float, float] | list[float] = (1 / 3, 1 / 3, 1 / 3),
        penalty: float = 0.0,
        train_mode: str = "random",
        eval_mode: str = "router",
        activation: str = "swiglu",
        router_init_std: float = 0.02,
    ) -> None:
        super().__init__(train_mode=train_mode, eval_mode=eval_mode, activation=activation)
        if not 0 < small_ratio < 1:
            raise ConfigError(f"small_ratio must be in (0, 1) (small FFN width / big FFN width), got {small_ratio}.")
        probs = [float(p) for p in random_probs]
        if len(probs) != 3 or min(probs) < 0 or sum(probs) <= 0:
            raise ConfigError(f"random_probs must be 3 non-negative numbers (skip, small, big), got {random_probs}.")
        self.d_model, self.n_layers, self.d_ff = d_model, n_layers, d_ff
        self.small_width = max(1, int(round(d_ff * small_ratio)))
        self.register_buffer("random_probs", torch.tensor(probs) / sum(probs), persistent=False)
        self.penalty = float(penalty)
        self.small_ffns = nn.ModuleList(DenseFFN(d_model, self.small_width, activation) for _ in range(n_layers))
        self.routers = nn.ModuleList(
            create_router("switch", d_model=d_model, num_experts=3, top_k=1, aux_loss_coef=0.0,
                          router_init_std=router_init_std)
            for _ in range(n_layers)
        )
        self.costs = torch.tensor([0.0, self.small_width / d_ff, 1.0])
        self._given: torch.Tensor | None = None
        self.record_inputs: list[torch.Tensor] | None = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "small_width": self.small_width, "big_width": self.d_ff, "penalty": self.penalty}

    def set_choices(self, choice_LBS: torch.Tensor | None) -> None:
        """Per-token choices ``[layers, batch, seq]`` (0 skip, 1 small, 2 big) for mode ``given``."""
        self._given = choice_LBS

    def choose(self, layer: int, h_BSD: torch.Tensor, padding_mask_BS, context, result: DepthResult) -> torch.Tensor:
        batch, seq, _ = h_BSD.shape
        mode = self.mode
        if mode == "given":
            if self._given is None or tuple(self._given.shape) != (self.n_layers, batch, seq):
                raise ConfigError(f"duo mode 'given' needs set_choices() with shape [{self.n_layers}, {batch}, {seq}].")
            return self._given[layer].to(h_BSD.device).long()
        if mode in ("big", "small", "skip"):
            return torch.full((batch, seq), DUO_OPTIONS.index(mode), dtype=torch.long, device=h_BSD.device)
        if mode == "random":
            draws = torch.multinomial(self.random_probs, batch * seq, replacement=True)
            return draws.view(batch, seq).to(h_BSD.device)
        h_TD, tokens = flat_tokens(h_BSD.detach(), padding_mask_BS, context)
        routing = self.routers[layer](h_TD, tokens)
        result.routings.append(routing)
        result.flops.linear(self.d_model, 3, tokens.num_tokens, part="depth_router")
        choice_T = (routing.logits - self.penalty * self.costs.to(routing.logits.device)).argmax(dim=-1)
        return to_grid(choice_T, tokens, SKIP)

    def forward(self, blocks, x_BSD, cos_Sd, sin_Sd, attn_mask_BSS, padding_mask_BS, context):
        result = DepthResult()
        for index, block in enumerate(blocks):
            if getattr(block, "is_moe", False):
                raise ConfigError("duo routes dense FFNs (small / big / skip); build the TinyLM with ffn='dense'.")
            x_BSD = x_BSD + attention_delta(block, x_BSD, cos_Sd, sin_Sd, padding_mask_BS, result.flops, attn_mask_BSS,
                                            context)
            h_BSD = block.ffn_norm(x_BSD)
            if self.record_inputs is not None:
                self.record_inputs.append(h_BSD.detach())
            choice_BS = self.choose(index, h_BSD, padding_mask_BS, context, result)
            real_BS = padding_mask_BS if padding_mask_BS is not None else torch.ones_like(choice_BS, dtype=torch.bool)
            y_BSD = torch.zeros_like(x_BSD)
            flat_h = h_BSD.reshape(-1, h_BSD.shape[-1])
            flat_y = y_BSD.reshape(-1, h_BSD.shape[-1])
            for option, ffn, width in ((SMALL, self.small_ffns[index], self.small_width), (BIG, block.ffn, ffn_width(block.ffn))):
                rows = ((choice_BS == option) & real_BS).reshape(-1).nonzero(as_tuple=True)[0]
                if rows.numel():
                    flat_y = flat_y.index_copy(0, rows, ffn(flat_h.index_select(0, rows)).to(flat_y.dtype))
                    result.flops.ffn(self.d_model, width, int(rows.numel()), self.activation)
            x_BSD = x_BSD + flat_y.view_as(x_BSD)
            result.decisions.append(LayerDecision(index, DUO_OPTIONS, torch.where(real_BS, choice_BS, -1)))
        return x_BSD, result
