"""Helpers shared by the registry-wide tests: build any preset and call it with what it needs."""

from __future__ import annotations

import torch

import routelab
from routelab.routers.parts.router import RoutingDraft, Scorer
from routelab.routers.registry import PRESETS, PresetInfo

ALL_PRESETS = [info.name for info in PRESETS]


def preset(name: str) -> PresetInfo:
    return routelab.preset_info(name)


def valid_top_k(info: PresetInfo, num_experts: int, wanted: int) -> int | None:
    """A top_k the preset accepts for ``num_experts`` experts (None if impossible)."""
    k = max(min(wanted, num_experts), info.min_top_k)
    return k if k <= num_experts else None


def side_inputs(batch: int, seq: int, vocab: int = 97, seed: int = 0) -> dict[str, torch.Tensor]:
    """token_ids, a causal head-averaged attention matrix, and a timestep per sequence."""
    g = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    scores = torch.randn(batch, seq, seq, generator=g)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    attention = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    timestep = torch.rand(batch, generator=g)
    return {"token_ids": token_ids, "attention": attention, "timestep": timestep}


def make_layer(name: str, *, d_model: int = 8, d_hidden: int = 12, num_experts: int = 4, top_k: int | None = None, seed: int = 0, **options) -> routelab.MoE:
    torch.manual_seed(seed)
    return routelab.moe_layer(d_model=d_model, d_hidden=d_hidden, num_experts=num_experts, top_k=top_k, router=name,
                              **options)


class FixedScorer(Scorer):
    """Returns the logits it was given (to test selectors, gates and losses on exact numbers)."""

    def __init__(self, logits_TE: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("fixed", logits_TE.float())

    def forward(self, x_TD: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        return self.fixed
