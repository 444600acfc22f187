"""A tiny language model built from routelab.MoE layers, for trace and diagnostics tests."""

from __future__ import annotations

import torch
from torch import nn

from routelab.core.context import RoutingContext
from routelab.moe import MoE


class ToyMoELM(nn.Module):
    """Embedding -> ``num_layers`` residual MoE FFNs -> tied output head."""

    def __init__(self, vocab_size: int = 50, d_model: int = 16, num_layers: int = 3, num_experts: int = 6,
                 top_k: int = 2, router: str = "mixtral", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(
            MoE(d_model=d_model, d_hidden=2 * d_model, num_experts=num_experts, top_k=top_k, router=router)
            for _ in range(num_layers)
        )
        self.config = {"vocab_size": vocab_size, "d_model": d_model, "num_layers": num_layers,
                       "num_experts": num_experts, "top_k": top_k, "router": router}

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        context = RoutingContext(token_ids=input_ids, padding_mask=padding_mask)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = x + block(x, context=context).y
        return x @ self.embed.weight.T


def single_thread():
    """Generator for an autouse fixture: run torch single-threaded (tiny models are far faster on a loaded machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
