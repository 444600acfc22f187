"""Moving per-token rows (real tokens only, ``T`` of them) to and from the padded
``[batch, seq]`` layout, for routers that work within each sequence."""

from __future__ import annotations

import torch

from routelab.core.context import TokenBatch


def to_padded(values_TF: torch.Tensor, batch: TokenBatch, fill: float = 0.0) -> torch.Tensor:
    """Scatter per-token rows into the padded ``[B, S, F]`` layout (``fill`` at padding)."""
    padded = values_TF.new_full((batch.batch_size * batch.seq_len, values_TF.shape[-1]), fill)
    padded = padded.index_copy(0, batch.flat_index_T, values_TF)
    return padded.view(batch.batch_size, batch.seq_len, values_TF.shape[-1])


def real_token_mask(batch: TokenBatch, device: torch.device) -> torch.Tensor:
    """``[B, S]`` bool, True at real tokens."""
    mask = torch.zeros(batch.batch_size * batch.seq_len, dtype=torch.bool, device=device)
    mask[batch.flat_index_T] = True
    return mask.view(batch.batch_size, batch.seq_len)
