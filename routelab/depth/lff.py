"""Informed routing with lightweight feature forecasters (LFF) (arXiv 2510.13831):
execute-or-approximate instead of execute-or-skip.

Per unit (here the FFN of each block) a tiny two-layer linear forecaster
``y_hat = W2 W1 h`` (rank ``r << d``) predicts the unit's output from its input; it is
trained with MSE on the frozen model's activations (``fit_lff``). A per-token router
scores how badly the forecast would do: a linear head trained to predict
``log ||f(h) - y_hat||`` (the recoverability the paper combines with importance; this
scoring rule is a reconstruction). The tokens with the highest scores run the real unit,
the others receive ``x + y_hat`` instead of being skipped. ``sparsity`` is the share of
tokens that run the unit.

Modes: ``topk`` picks the top ``sparsity`` share of each sequence (non-causal);
``threshold`` runs a token iff its score exceeds a threshold calibrated on training data
to the same share (causal, decided per token, so it works with a KV cache); ``execute``
runs every token (the base model). An LFF equal to the unit gives identical outputs at
any sparsity, and ``sparsity = 1`` is the base model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from routelab.core.errors import ConfigError
from routelab.depth.blocks import attention_delta, ffn_width
from routelab.depth.result import DepthResult, LayerDecision
from routelab.depth.stack import DepthStack

LFF_OPTIONS = ("approximate", "execute")


class Forecaster(nn.Module):
    """``y_hat = W2 (W1 h)``, rank ``r``."""

    def __init__(self, d_model: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, d_model, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(h))


class LFFStack(DepthStack):
    """Execute-or-approximate FFNs (see the module docstring).

    Args:
        rank: forecaster rank ``r``.
        sparsity: share of tokens that run the real FFN (0 < rho <= 1).
        eval_mode: ``threshold`` (default; causal), ``topk`` or ``execute``.
    """

    name = "lff"
    modes = ("topk", "threshold", "execute")
    causal_modes = ("threshold", "execute")

    def __init__(self, d_model: int, n_layers: int, *, rank: int = 16, sparsity: float = 0.5,
                 train_mode: str = "execute", eval_mode: str = "threshold", activation: str = "swiglu") -> None:
        super().__init__(train_mode=train_mode, eval_mode=eval_mode, activation=activation)
        if not 0 < float(sparsity) <= 1:
            raise ConfigError(f"sparsity must be in (0, 1] (share of tokens that run the unit), got {sparsity}.")
        self.d_model, self.rank, self.sparsity = d_model, int(rank), float(sparsity)
        self.forecasters = nn.ModuleList(Forecaster(d_model, self.rank) for _ in range(n_layers))
        self.scorers = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(n_layers))
        self.register_buffer("thresholds", torch.full((n_layers,), float("-inf")))
        self.unit_override: list[nn.Module] | None = None  # tests: forecasters replaced by arbitrary modules
        self.record_inputs: list[torch.Tensor] | None = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "rank": self.rank, "sparsity": self.sparsity}

    def forecast(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        if self.unit_override is not None:
            return self.unit_override[layer](h)
        return self.forecasters[layer](h)

    def select(self, layer: int, score_BS: torch.Tensor, real_BS: torch.Tensor) -> torch.Tensor:
        mode = self.mode
        if mode == "execute":
            return real_BS.clone()
        if mode == "threshold":
            return (score_BS > self.thresholds[layer]) & real_BS
        masked = score_BS.masked_fill(~real_BS, float("-inf"))
        keep_B = (real_BS.sum(dim=1).float() * self.sparsity).ceil().long()
        order = masked.argsort(dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        return (ranks < keep_B.unsqueeze(1)) & real_BS

    def forward(self, blocks, x_BSD, cos_Sd, sin_Sd, attn_mask_BSS, padding_mask_BS, context):
        result = DepthResult()
        batch, seq, d_model = x_BSD.shape
        real_BS = padding_mask_BS if padding_mask_BS is not None else torch.ones(batch, seq, dtype=torch.bool,
                                                                                 device=x_BSD.device)
        for index, block in enumerate(blocks):
            if getattr(block, "is_moe", False):
                raise ConfigError("lff approximates dense FFNs; build the TinyLM with ffn='dense'.")
            x_BSD = x_BSD + attention_delta(block, x_BSD, cos_Sd, sin_Sd, padding_mask_BS, result.flops, attn_mask_BSS,
                                            context)
            h_BSD = block.ffn_norm(x_BSD)
            if self.record_inputs is not None:
                self.record_inputs.append(h_BSD.detach())
            score_BS = self.scorers[index](h_BSD.detach().float()).squeeze(-1)
            run_BS = self.select(index, score_BS, real_BS)
            if self.mode != "execute":
                result.flops.linear(d_model, 1, int(real_BS.sum()), part="depth_router")
            flat_h = h_BSD.reshape(-1, d_model)
            run_rows = run_BS.reshape(-1).nonzero(as_tuple=True)[0]
            approx_rows = (~run_BS & real_BS).reshape(-1).nonzero(as_tuple=True)[0]
            y = torch.zeros_like(flat_h)
            if run_rows.numel():
                y = y.index_copy(0, run_rows, block.ffn(flat_h.index_select(0, run_rows)).to(y.dtype))
                result.flops.ffn(d_model, ffn_width(block.ffn), int(run_rows.numel()), self.activation)
            if approx_rows.numel():
                y = y.index_copy(0, approx_rows, self.forecast(index, flat_h.index_select(0, approx_rows)).to(y.dtype))
                result.flops.linear(d_model, self.rank, int(approx_rows.numel()), part="forecaster")
                result.flops.linear(self.rank, d_model, int(approx_rows.numel()), part="forecaster")
            x_BSD = x_BSD + y.view_as(x_BSD)
            choice = torch.where(real_BS, run_BS.long(), -1)
            result.decisions.append(LayerDecision(index, LFF_OPTIONS, choice))
        return x_BSD, result
