"""Mixture of Shards (MoS): LoRA factors assembled from global pools of shared shards.

Wang et al. 2025, "MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with
Mixture of Shards" (ICLR 2025, arXiv 2410.00938, code ``Forence1999/MoS``). Per module
type (``qkv``, ``out``, ...) one global pool of shard vectors; each layer's LoRA rank
vectors are concatenations of shards picked by a per-layer index map. The four
differentiation strategies are options:

- subset selection: each layer draws its own shard indices (``indices="random"``, seeded);
- pair dissociation: ``A`` and ``B`` draw independent indices (``pair_dissociation``);
- vector sharding: each rank vector is ``num_chunk`` shards of ``d / num_chunk``;
- shard privatisation: ``num_private_rank`` rank vectors per layer are the layer's own.

Plus a learnable scale per (rank vector, shard), initialised 1. ``indices="identity"``
gives layer ``l`` the shards ``[l r c, (l + 1) r c)`` in order: with a pool of
``layers * rank`` shards and ``num_chunk = 1`` this is exactly one LoRA per layer. The
pool of ``B`` starts at 0, so a fresh MoS changes nothing (as LoRA).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from routelab.adapters.targets import find_targets, replace_module
from routelab.core import ConfigError
from routelab.core.validation import check_choice, check_positive_int

INDEX_MODES = ("random", "identity")


class ShardPool(nn.Module):
    """``num_shards`` vectors of width ``shard_dim`` shared by every layer of one module type."""

    def __init__(self, num_shards: int, shard_dim: int, init_bound: float) -> None:
        super().__init__()
        self.shards = nn.Parameter(torch.empty(num_shards, shard_dim).uniform_(-init_bound, init_bound)
                                   if init_bound > 0 else torch.zeros(num_shards, shard_dim))


class MoSLoRALinear(nn.Module):
    """A frozen linear plus a LoRA whose rank vectors come from shard pools.

    ``A`` ``[r, d_in]`` rows and ``B`` ``[d_out, r]`` columns are rank vectors; the first
    ``r - num_private_rank`` are assembled from the pools, the rest are private.
    """

    def __init__(self, base: nn.Linear, pool_a: ShardPool, pool_b: ShardPool, index_a: torch.Tensor,
                 index_b: torch.Tensor, rank: int, num_private_rank: int, scaling: float) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.pool_a, self.pool_b = pool_a, pool_b
        self.rank, self.num_private_rank, self.scaling = rank, num_private_rank, scaling
        shared, chunks = index_a.shape
        self.register_buffer("index_a", index_a)
        self.register_buffer("index_b", index_b)
        self.scale_a = nn.Parameter(torch.ones(shared, chunks))
        self.scale_b = nn.Parameter(torch.ones(shared, chunks))
        bound = 1.0 / math.sqrt(base.in_features)
        self.private_a = nn.Parameter(torch.empty(num_private_rank, base.in_features).uniform_(-bound, bound))
        self.private_b = nn.Parameter(torch.zeros(base.out_features, num_private_rank))

    def lora_a(self) -> torch.Tensor:
        """``[r, d_in]``."""
        shared = (self.pool_a.shards[self.index_a] * self.scale_a.unsqueeze(-1)).flatten(1)
        return torch.cat([shared, self.private_a], dim=0)

    def lora_b(self) -> torch.Tensor:
        """``[d_out, r]``."""
        shared = (self.pool_b.shards[self.index_b] * self.scale_b.unsqueeze(-1)).flatten(1)
        return torch.cat([shared.T, self.private_b], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_a().to(x.dtype), self.lora_b().to(x.dtype)
        return self.base(x) + (x @ a.T) @ b.T * self.scaling


def attach_mos(
    model: nn.Module,
    target_modules: str | Sequence[str],
    *,
    rank: int = 8,
    num_shards: int | None = None,
    num_chunk: int = 1,
    num_private_rank: int = 0,
    pair_dissociation: bool = True,
    indices: str = "random",
    lora_alpha: float | None = None,
    seed: int = 0,
) -> dict[str, MoSLoRALinear]:
    """Replace the target linears of ``model`` by ``MoSLoRALinear`` layers; freeze the rest.

    Args:
        num_shards: shards per pool (default: ``layers * shared rank * num_chunk`` of the
            module type, i.e. the parameters of one plain LoRA per layer).
        lora_alpha: scaling numerator (default ``rank``, scaling 1).
    Returns ``{module name: layer}``.
    """
    check_positive_int("rank", rank)
    check_positive_int("num_chunk", num_chunk)
    check_positive_int("num_private_rank", num_private_rank, minimum=0)
    check_choice("indices", indices, INDEX_MODES)
    if num_private_rank > rank:
        raise ConfigError(f"num_private_rank={num_private_rank} must be <= rank={rank}.")
    shared = rank - num_private_rank
    targets = find_targets(model, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    groups: dict[tuple[str, int, int], list[tuple[str, nn.Linear]]] = {}
    for name, linear in targets:
        if linear.in_features % num_chunk or linear.out_features % num_chunk:
            raise ConfigError(f"num_chunk={num_chunk} must divide the widths of {name} ({linear.in_features}->"
                              f"{linear.out_features}).")
        groups.setdefault((name.rsplit(".", 1)[-1], linear.in_features, linear.out_features), []).append((name, linear))
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, MoSLoRALinear] = {}
    for (_, d_in, d_out), members in groups.items():
        per_layer = shared * num_chunk
        pool_size = num_shards if num_shards is not None else max(per_layer * len(members), 1)
        if indices == "identity" and pool_size < per_layer * len(members):
            raise ConfigError(f"indices='identity' needs num_shards >= layers * shared rank * num_chunk = "
                              f"{per_layer * len(members)}, got {pool_size}.")
        if per_layer > pool_size:
            raise ConfigError(f"each layer needs {per_layer} distinct shards but num_shards={pool_size}.")
        device = members[0][1].weight.device
        pool_a = ShardPool(pool_size, d_in // num_chunk, 1.0 / math.sqrt(d_in)).to(device)
        pool_b = ShardPool(pool_size, d_out // num_chunk, 0.0).to(device)
        for position, (name, linear) in enumerate(members):
            if indices == "identity":
                index_a = torch.arange(position * per_layer, (position + 1) * per_layer)
                index_b = index_a.clone()
            else:
                index_a = torch.randperm(pool_size, generator=generator)[:per_layer]
                index_b = torch.randperm(pool_size, generator=generator)[:per_layer] if pair_dissociation else index_a.clone()
            layer = MoSLoRALinear(linear, pool_a, pool_b, index_a.view(shared, num_chunk).to(device),
                                  index_b.view(shared, num_chunk).to(device), rank, num_private_rank,
                                  (lora_alpha if lora_alpha is not None else rank) / rank).to(device)
            replace_module(model, name, layer)
            layers[name] = layer
    return layers
