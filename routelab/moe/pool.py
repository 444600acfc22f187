"""Expert pools shared across layers, for ReXMoE (Tan et al. 2025, "ReXMoE: Reusing
Experts with Minimal Overhead in Mixture-of-Experts").

``ExpertPool`` presents the experts of several layers as one expert module of
``sum(E_b)`` experts: rows sorted by pool index are split per block and each block runs
its own grouped GEMM, so no weight is copied. The blocks are shared modules: the same
``BatchedExperts`` appears in the pools of adjacent layers (its parameters are listed
once by ``parameters()``; ``state_dict`` lists them under every layer that uses them).

``build_rexmoe_layers`` builds the MoE layers of a model with reuse factor ``R``: layer
``l`` routes over the experts of the ``R`` consecutive layers centred on ``l`` (shifted
at the ends so every pool has ``R * E`` experts), with the ``"rexmoe"`` router whose
PSR schedule starts from the layer's own block. Add ``end_of_step(model)`` after each
optimizer step to advance PSR.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from routelab.core.errors import ConfigError
from routelab.core.validation import check_positive_int
from routelab.moe.experts import BatchedExperts
from routelab.moe.layer import MoE


class ExpertPool(nn.Module):
    """Several ``BatchedExperts`` blocks seen as one expert module (pool index = block offset + expert)."""

    def __init__(self, blocks: Sequence[BatchedExperts]) -> None:
        super().__init__()
        if not blocks:
            raise ConfigError("an ExpertPool needs at least one block of experts.")
        widths = {block.d_model for block in blocks}
        if len(widths) != 1:
            raise ConfigError(f"all blocks of an ExpertPool must share d_model, got {sorted(widths)}.")
        self.blocks = nn.ModuleList(blocks)
        self.d_model = blocks[0].d_model
        self.block_sizes = [block.num_experts for block in blocks]
        self.num_experts = sum(self.block_sizes)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, blocks={self.block_sizes}"

    def forward_sorted(self, x_ND: torch.Tensor, counts_E: torch.Tensor, weight_N: torch.Tensor | None = None) -> torch.Tensor:
        """As ``BatchedExperts.forward_sorted`` over the pool (rows sorted by pool index)."""
        outputs = []
        row_start, expert_start = 0, 0
        rows_per_block = [int(c.sum()) for c in counts_E.split(self.block_sizes)]
        for block, size, rows in zip(self.blocks, self.block_sizes, rows_per_block):
            block_counts = counts_E[expert_start : expert_start + size]
            expert_start += size
            if rows == 0:
                continue
            sl = slice(row_start, row_start + rows)
            row_start += rows
            outputs.append(block.forward_sorted(x_ND[sl], block_counts, None if weight_N is None else weight_N[sl]))
        if not outputs:
            return x_ND.new_zeros(0, self.d_model)
        return torch.cat(outputs, dim=0)

    def locate(self, expert: int) -> tuple[BatchedExperts, int]:
        for block, size in zip(self.blocks, self.block_sizes):
            if expert < size:
                return block, expert
            expert -= size
        raise ConfigError(f"expert {expert} is outside the pool of {self.num_experts} experts.")

    def expert_forward(self, expert: int, x_ND: torch.Tensor) -> torch.Tensor:
        block, local = self.locate(expert)
        return block.expert_forward(local, x_ND)

    def gate_projection(self) -> torch.Tensor:
        """``[sum E_b, D, H]`` (blocks must share ``d_hidden`` and activation)."""
        hidden = {block.d_hidden for block in self.blocks}
        if len(hidden) != 1:
            raise ConfigError(f"gate_projection() needs blocks of equal d_hidden, got {sorted(hidden)}.")
        return torch.cat([block.gate_projection() for block in self.blocks], dim=0)


def reuse_window(layer: int, num_layers: int, reuse_factor: int) -> int:
    """First layer of the ``reuse_factor`` consecutive layers whose experts layer ``layer`` reuses."""
    return min(max(layer - (reuse_factor - 1) // 2, 0), num_layers - reuse_factor)


def build_rexmoe_layers(
    num_layers: int,
    *,
    d_model: int,
    d_hidden: int,
    num_experts: int,
    top_k: int | None = None,
    reuse_factor: int = 3,
    psr_steps: int = 1000,
    activation: str = "swiglu",
    dispatch: str = "auto",
    **layer_options: Any,
) -> nn.ModuleList:
    """The MoE layers of a ReXMoE model (see module docstring).

    Args:
        num_layers: MoE layers ``L`` (>= ``reuse_factor``).
        num_experts: experts owned by each layer ``E``; each router scores ``R * E``.
        reuse_factor: ``R``, layers whose experts one router may use (3 = l-1, l, l+1).
        psr_steps: optimizer steps of progressive scaling routing.
        **layer_options: further ``MoE`` / router options (``aux_loss_coef``,
            ``num_shared_experts``, ...).
    """
    num_layers = check_positive_int("num_layers", num_layers)
    reuse_factor = check_positive_int("reuse_factor", reuse_factor)
    if reuse_factor > num_layers:
        raise ConfigError(f"reuse_factor={reuse_factor} needs at least that many MoE layers, got num_layers={num_layers}.")
    blocks = [BatchedExperts(num_experts, d_model, d_hidden, activation, dispatch) for _ in range(num_layers)]
    layers = []
    for layer in range(num_layers):
        start = reuse_window(layer, num_layers, reuse_factor)
        pool = ExpertPool(blocks[start : start + reuse_factor])
        layers.append(
            MoE(
                d_model=d_model,
                d_hidden=d_hidden,
                num_experts=pool.num_experts,
                top_k=top_k,
                router="rexmoe",
                experts=pool,
                reuse_factor=reuse_factor,
                local_block=layer - start,
                psr_steps=psr_steps,
                **layer_options,
            )
        )
    return nn.ModuleList(layers)
